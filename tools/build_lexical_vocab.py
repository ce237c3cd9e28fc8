#!/usr/bin/env python
"""Build the relation table (noun -> synonyms / hyponyms / meronyms of the test classes) of a
dataset's vocabulary for the open-ended evaluation (cfg.TEST.OPEN_ENDED.RELATION_TABLE; the
file format is in openseg/evaluation/lexical.py).

Two sources:
* WordNet 3.0 (default, offline): restricted to the senses that fit each class. WordNet comes
  from Debian's `wordnet-base` + `wordnet-sense-index` packages: run
  `bash tools/setup_wordnet.sh` once.
* A local LLM (`--llm`, as the paper's App. A with its Fig. 5 prompt): a Hugging Face model
  directory or a GGUF file. Every noun of `--nouns` (one per line; the paper uses Tag2Text's
  tag list) is asked; without `--nouns`, the nouns of the WordNet table and the class names.

    python tools/build_lexical_vocab.py --dataset openseg_demo_val --output out/demo_lexical.json
    python tools/build_lexical_vocab.py --dataset openseg_cityscapes_fine_panoptic_val \\
        --llm /models/Qwen2.5-7B-Instruct --nouns tag2text_nouns.txt --output cityscapes_llm.json
"""

import argparse
import logging

import openseg  # noqa: F401  (registers the datasets)
from openseg.data.vocab import get_vocabulary
from openseg.evaluation.lexical import (
    build_llm_relation_table,
    build_wordnet_relation_table,
    load_local_llm,
    load_wordnet,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", required=True, help="registered dataset whose vocabulary to use"
    )
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument(
        "--min-sense-share",
        type=float,
        default=0.2,
        help="a word stands for the WordNet senses tagged at least this share as often as its "
        "most frequent one",
    )
    parser.add_argument(
        "--meronym-inherit-depth",
        type=int,
        default=5,
        help="hypernym levels whose parts a class inherits (a dog has a vertebrate's tail)",
    )
    parser.add_argument("--part-depth", type=int, default=3, help="levels of parts of parts")
    parser.add_argument(
        "--llm", default="", help="local HF model dir or .gguf file: build with the Fig. 5 prompt"
    )
    parser.add_argument("--nouns", default="", help="noun list (one per line) for --llm")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="LLM answer length")
    parser.add_argument("--device", default="cpu", help="device of the LLM")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    vocabulary = get_vocabulary(args.dataset)

    if args.llm and args.nouns:
        with open(args.nouns) as f:
            nouns = [line.strip() for line in f if line.strip()]
    else:
        wordnet_table = build_wordnet_relation_table(
            vocabulary,
            load_wordnet(),
            min_sense_share=args.min_sense_share,
            meronym_inherit_depth=args.meronym_inherit_depth,
            part_depth=args.part_depth,
        )
        nouns = sorted(set(wordnet_table.nouns()) | set(wordnet_table.class_names))
    if args.llm:
        generate = load_local_llm(args.llm, args.max_new_tokens, args.device)
        table = build_llm_relation_table(
            vocabulary, nouns, generate, source=f"LLM {args.llm}, Fig. 5 prompt, {len(nouns)} nouns"
        )
    else:
        table = wordnet_table
    table.to_json(args.output)
    logging.info(
        f"{len(table)} nouns related to the {len(vocabulary)} classes of {args.dataset} -> "
        f"{args.output}"
    )


if __name__ == "__main__":
    main()
