#!/usr/bin/env python
"""Write openseg's copies of FC-CLIP's class-name / synonym lists.

    python tools/import_fcclip_vocabularies.py --reference-root ../shared/reference

FC-CLIP (Yu et al. NeurIPS 2023) names every class of a test set by a hand-made synonym list
(the release's `fcclip/data/datasets/*_with_prompt_eng.txt`, lines ``<id>:name,synonym,...``,
with ``invalid_class_id`` placeholders). This script writes them as openseg's
`openseg/data/vocabularies/fcclip/<vocabulary>.txt`: one class per line in contiguous-id
order, synonyms separated by ``,`` (the first is the class name), placeholders dropped. The
files are committed; nothing reads the release at run time.
"""
import argparse
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "openseg" / "data" / "vocabularies" / "fcclip"
RELEASE_DIR = Path("bytedance__fc-clip") / "fcclip" / "data" / "datasets"
# openseg vocabulary name -> release file
FILES = {
    "coco_panoptic": "coco_panoptic_with_prompt_eng.txt",
    "coco_stuff": "coco_stuff_with_prompt_eng.txt",
    "ade20k_150": "ade20k_150_with_prompt_eng.txt",
    "ade20k_847": "ade20k_847_with_prompt_eng.txt",
    "cityscapes": "cityscapes_with_prompt_eng.txt",
    "mapillary_vistas": "mapillary_vistas_with_prompt_eng.txt",
    "pascal_context_59": "pascal_ctx_59_with_prompt_eng.txt",
    "pascal_context_459": "pascal_ctx_459_with_prompt_eng.txt",
    "pascal_voc_21": "pascal_voc_21_with_prompt_eng.txt",
    "lvis_1203": "lvis_1203_with_prompt_eng.txt",
}


def read_release_file(path: Path) -> list:
    """Synonym lists in file order, without the `invalid_class_id` placeholders."""
    classes = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        _, names = line.split(":", 1)
        if names == "invalid_class_id":
            continue
        classes.append(names.replace(", ", ",").split(","))
    return classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-root", type=Path, required=True)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, release_file in FILES.items():
        classes = read_release_file(args.reference_root / RELEASE_DIR / release_file)
        lines = [f"# FC-CLIP class names and synonyms ({release_file} of bytedance/fc-clip),",
                 "# one class per line in contiguous-id order; written by tools/import_fcclip_vocabularies.py"]
        lines += [",".join(names) for names in classes]
        (OUT / f"{name}.txt").write_text("\n".join(lines) + "\n")
        print(f"{name}: {len(classes)} classes")


if __name__ == "__main__":
    main()
