"""LVIS v1 instance segmentation (1203 classes): `lvis/lvis_v1_{train,val}.json` + COCO 2017
images under `coco/{train,val}2017` (the image folder is read from each image's `coco_url`).

The vocabulary is LVIS v1's category table as shipped with detectron2, so `thing_classes` is
available without the 1 GB annotation file; loading a split checks that its categories match
that table and fails naming the file otherwise.
"""

import json
from functools import partial
from pathlib import Path
from typing import Dict, List, Mapping

from detectron2.data.datasets.lvis import load_lvis_json
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

from .common import register_lazy, require

_CATEGORIES = sorted(LVIS_CATEGORIES, key=lambda c: c["id"])
LVIS_V1_CLASSES: List[str] = [c["name"] for c in _CATEGORIES]
LVIS_V1_SYNONYMS: List[List[str]] = [
    [c["name"]] + [s for s in dict.fromkeys(c["synonyms"]) if s != c["name"]] for c in _CATEGORIES
]
LVIS_V1_FREQUENCIES: List[str] = [c["frequency"] for c in _CATEGORIES]  # r / c / f
_DOWNLOAD = (
    "download lvis_v1_{split}.json from https://www.lvisdataset.org into $OPENSEG_DATASETS/lvis"
)


def lvis_v1_metadata() -> Dict:
    """Metadata of both splits: contiguous id = LVIS category id - 1 (ids are 1..1203)."""
    return {
        "thing_classes": list(LVIS_V1_CLASSES),
        "stuff_classes": list(LVIS_V1_CLASSES),
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(_CATEGORIES)},
        "synonyms": [list(s) for s in LVIS_V1_SYNONYMS],
        "frequencies": list(LVIS_V1_FREQUENCIES),
        "ignore_label": 255,
        "evaluators": ["instance"],
    }


# LVIS's federated image labels (Gupta et al. CVPR 2019, Sec. 3): classes whose instances are
# not all annotated in the image, and classes verified absent from it. Dataset dicts keep the
# LVIS ids under the json's keys (as detectron2's LVIS loader) and the contiguous ids under
# the values' keys, which the mappers pass on to the model (SegPrompt's class selection).
FEDERATED_KEYS = {
    "not_exhaustive_category_ids": "not_exhaustive_classes",
    "neg_category_ids": "neg_classes",
}


def add_federated_classes(record: dict, image: Mapping, id_map: Mapping[int, int]) -> None:
    """Copy LVIS's federated lists of `image` (a json image entry) into `record`: the LVIS
    ids as they are and, mapped through `id_map`, the contiguous ids (`FEDERATED_KEYS`)."""
    for key, contiguous_key in FEDERATED_KEYS.items():
        ids = [int(i) for i in image.get(key, [])]
        unknown = [i for i in ids if i not in id_map]
        if unknown:
            raise ValueError(
                f"image {image.get('id')}: {key} {unknown[:5]} are not categories of the "
                "dataset; the annotation file and the LVIS v1 vocabulary disagree."
            )
        record[key] = ids
        record[contiguous_key] = [id_map[i] for i in ids]


def _check_categories(json_file: Path, categories: List[Dict]) -> None:
    """The annotation file must define the v1 vocabulary the metadata announces."""
    names = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    ids = sorted(c["id"] for c in categories)
    if ids != list(range(1, len(ids) + 1)):
        raise ValueError(f"{json_file}: LVIS category ids must be 1..{len(ids)}, got {ids[:5]}...")
    known = {c["id"]: c["name"] for c in _CATEGORIES}
    wrong = [(i, n) for i, n in zip(ids, names) if known.get(i) != n]
    if wrong:
        raise ValueError(
            f"{json_file}: categories {wrong[:3]} differ from LVIS v1 (id, name); "
            "use the official lvis_v1_*.json files"
        )


def load_lvis_v1(root: Path, split: str) -> List[dict]:
    """Instance dicts of one LVIS v1 split (polygons, XYWH boxes, contiguous category ids,
    the federated lists as `add_federated_classes`)."""
    json_file = require(root / "lvis" / f"lvis_v1_{split}.json", _DOWNLOAD.format(split=split))
    image_root = require(root / "coco", "download COCO 2017 images into $OPENSEG_DATASETS/coco")
    with open(json_file) as f:
        _check_categories(json_file, json.load(f)["categories"])
    dicts = load_lvis_json(str(json_file), str(image_root) + "/")
    id_map = lvis_v1_metadata()["thing_dataset_id_to_contiguous_id"]
    for record in dicts:  # detectron2 keeps the federated lists (LVIS ids) in each record
        add_federated_classes(record, record, id_map)
    return dicts


def register_all_lvis(root: Path) -> None:
    """Register openseg_lvis_v1_{train,val}."""
    root = Path(root)
    for split in ("train", "val"):
        register_lazy(
            f"openseg_lvis_v1_{split}",
            partial(load_lvis_v1, root, split),
            json_file=str(root / "lvis" / f"lvis_v1_{split}.json"),
            image_root=str(root / "coco"),
            **lvis_v1_metadata(),
        )
