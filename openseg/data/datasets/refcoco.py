"""RefCOCOg, UMD partition (Nagaraja et al., ECCV 2016) for referring segmentation:
`refcoco/refcocog/refs(umd).p` + `refcoco/refcocog/instances.json` (the refer toolkit files) and
COCO train2014 images under `coco/train2014`.

One dict per referred object: the object's mask (COCO polygons or RLE) and box as the single
annotation, and every referring expression of it in "sentences".
"""

import json
import pickle
from functools import partial
from pathlib import Path
from typing import List, Set

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.structures import BoxMode

from .common import register_lazy, require

_COCO_THINGS = sorted((c for c in COCO_CATEGORIES if c["isthing"]), key=lambda c: c["id"])
_DOWNLOAD = (
    "download refcocog.zip of the refer toolkit (github.com/lichengunc/refer) "
    "into $OPENSEG_DATASETS/refcoco"
)


def load_refcocog_umd(root: Path, split: str) -> List[dict]:
    """Referring dicts of one split (train / val / test) of RefCOCOg-umd."""
    refcocog = root / "refcoco" / "refcocog"
    refs_file = require(refcocog / "refs(umd).p", _DOWNLOAD)
    instances_file = require(refcocog / "instances.json", _DOWNLOAD)
    image_root = require(
        root / "coco" / "train2014", "download COCO train2014 images into $OPENSEG_DATASETS/coco"
    )
    with open(refs_file, "rb") as f:
        refs = pickle.load(f)
    with open(instances_file) as f:
        instances = json.load(f)
    images = {image["id"]: image for image in instances["images"]}
    annotations = {annotation["id"]: annotation for annotation in instances["annotations"]}
    contiguous = {
        c["id"]: i for i, c in enumerate(sorted(instances["categories"], key=lambda c: c["id"]))
    }
    dicts = []
    for ref in refs:
        if ref["split"] != split:
            continue
        image = images[ref["image_id"]]
        annotation = annotations[ref["ann_id"]]
        dicts.append(
            {
                "file_name": str(image_root / image["file_name"]),
                "height": image["height"],
                "width": image["width"],
                "image_id": ref["image_id"],
                "ref_id": ref["ref_id"],
                "annotations": [
                    {
                        "segmentation": annotation["segmentation"],
                        "bbox": annotation["bbox"],
                        "bbox_mode": BoxMode.XYWH_ABS,
                        "category_id": contiguous[annotation["category_id"]],
                        "iscrowd": annotation.get("iscrowd", 0),
                    }
                ],
                "sentences": [sentence["sent"] for sentence in ref["sentences"]],
            }
        )
    if not dicts:
        raise ValueError(
            f"{refs_file} has no references of split '{split}' (expected train/val/test)"
        )
    return dicts


def refcocog_umd_image_ids(root: Path, split: str) -> Set[int]:
    """COCO image ids of one RefCOCOg-umd split (e.g. the val images OpenWorldSAM and
    X-Decoder leave out of COCO training)."""
    refs_file = require(Path(root) / "refcoco" / "refcocog" / "refs(umd).p", _DOWNLOAD)
    with open(refs_file, "rb") as f:
        return {ref["image_id"] for ref in pickle.load(f) if ref["split"] == split}


def register_all_refcoco(root: Path) -> None:
    """Register openseg_refcocog_umd_{train,val,test}."""
    root = Path(root)
    names = [c["name"] for c in _COCO_THINGS]
    for split in ("train", "val", "test"):
        register_lazy(
            f"openseg_refcocog_umd_{split}",
            partial(load_refcocog_umd, root, split),
            image_root=str(root / "coco" / "train2014"),
            json_file=str(root / "refcoco" / "refcocog" / "instances.json"),
            refs_file=str(root / "refcoco" / "refcocog" / "refs(umd).p"),
            thing_classes=list(names),
            stuff_classes=list(names),
            thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(_COCO_THINGS)},
            synonyms=[[name] for name in names],
            ignore_label=255,
            evaluators=["referring"],
        )
