#!/usr/bin/env python
"""Build the noun -> class relation table (exact / synonym / hyponym / meronym) of a test
vocabulary from WordNet 3.0, offline, for the open-ended evaluation (openseg/evaluation/lac.py).

WordNet comes from Debian's `wordnet-base` + `wordnet-sense-index` packages, read by nltk; run
`bash tools/setup_wordnet.sh` once. The JSON can then be edited or overridden by another table
(e.g. LLM-written relations) through cfg.TEST.OPEN_ENDED.RELATION_OVERRIDES.

    python tools/build_lexical_vocab.py --dataset openseg_demo_val --output out/demo_lexical.json
"""

import argparse
import logging

import openseg  # noqa: F401  (registers the datasets)
from openseg.data.vocab import get_vocabulary
from openseg.evaluation.lexical import build_wordnet_relation_table, load_wordnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", required=True, help="registered dataset whose vocabulary to use"
    )
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument(
        "--max-senses", type=int, default=3, help="WordNet noun senses per class name"
    )
    parser.add_argument(
        "--meronym-inherit-depth",
        type=int,
        default=2,
        help="hypernym levels whose parts a class inherits (a car has a wheeled vehicle's wheels)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    vocabulary = get_vocabulary(args.dataset)
    table = build_wordnet_relation_table(
        vocabulary, load_wordnet(), args.max_senses, args.meronym_inherit_depth
    )
    table.to_json(args.output)
    logging.info(
        f"{len(table)} nouns related to the {len(vocabulary)} classes of {args.dataset} -> {args.output}"
    )


if __name__ == "__main__":
    main()
