"""COCO 2017 panoptic (with semantic maps derived from it) and instance segmentation.

Expected layout under `dataset_root()` (as detectron2 / Mask2Former):

    coco/{train,val}2017/*.jpg
    coco/annotations/{instances,panoptic}_{train,val}2017.json
    coco/panoptic_{train,val}2017/*.png
    coco/panoptic_semseg_{train,val}2017/*.png   <- datasets/prepare_coco_semantic_from_panoptic.py

Contiguous ids follow Mask2Former: the 133 categories in id order (80 things first), all
listed in `stuff_classes`, with `stuff_dataset_id_to_contiguous_id` covering every category
so the semantic evaluator sees all of them.
"""

import os
from functools import partial
from pathlib import Path
from typing import Dict, List

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from ..vocab import coco_panoptic_vocabulary
from .common import coco_instance_dicts, coco_panoptic_dicts, register_lazy, require
from .refcoco import refcocog_umd_image_ids

PANOPTIC_CATEGORIES = sorted(COCO_CATEGORIES, key=lambda c: c["id"])  # things first
PREPARE_SEMANTIC = "python datasets/prepare_coco_semantic_from_panoptic.py"
DOWNLOAD = "download COCO 2017 images and annotations from https://cocodataset.org"
SPLITS = ("train", "val")


def coco_panoptic_metadata() -> dict:
    """Class names, colours, id maps and vocabulary of COCO panoptic (133 classes)."""
    names = [c["name"] for c in PANOPTIC_CATEGORIES]
    things = [c for c in PANOPTIC_CATEGORIES if c["isthing"]]
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [c["color"] for c in things],
        "stuff_classes": names,
        "stuff_colors": [c["color"] for c in PANOPTIC_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(PANOPTIC_CATEGORIES) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(PANOPTIC_CATEGORIES)
        },
        "ignore_label": 255,
        "label_divisor": 1000,
        "synonyms": coco_panoptic_vocabulary(names),
        # COCO is the training vocabulary of the open-vocabulary benchmarks: all seen
        "class_splits": {"seen": list(range(len(names))), "unseen": []},
    }


def coco_instance_metadata() -> dict:
    """COCO's 80 thing classes (contiguous ids 0..79), all seen: the instance datasets."""
    panoptic_meta = coco_panoptic_metadata()
    thing_count = len(panoptic_meta["thing_classes"])
    instance_meta = {
        key: panoptic_meta[key]
        for key in ("thing_classes", "thing_colors", "thing_dataset_id_to_contiguous_id")
    }
    instance_meta["synonyms"] = panoptic_meta["synonyms"][:thing_count]
    instance_meta["class_splits"] = {"seen": list(range(thing_count)), "unseen": []}
    return instance_meta


def coco_paths(root: Path, split: str) -> Dict[str, str]:
    coco = Path(root) / "coco"
    return {
        "image_root": str(coco / f"{split}2017"),
        "panoptic_root": str(coco / f"panoptic_{split}2017"),
        "panoptic_json": str(coco / "annotations" / f"panoptic_{split}2017.json"),
        "json_file": str(coco / "annotations" / f"instances_{split}2017.json"),
        "sem_seg_root": str(coco / f"panoptic_semseg_{split}2017"),
    }


def load_coco_panoptic_with_sem_seg(paths: Dict[str, str], meta: dict) -> List[dict]:
    """Panoptic dicts (contiguous category ids) plus `sem_seg_file_name`; raises
    DatasetNotFoundError naming the first missing path."""
    require(paths["image_root"], DOWNLOAD)
    require(paths["panoptic_json"], DOWNLOAD + " (panoptic_annotations_trainval2017.zip)")
    require(
        paths["panoptic_root"],
        "unzip the PNG archives inside panoptic_annotations_trainval2017.zip",
    )
    require(paths["sem_seg_root"], PREPARE_SEMANTIC)
    dicts = coco_panoptic_dicts(
        paths["panoptic_json"], paths["image_root"], paths["panoptic_root"], meta
    )
    for record in dicts:
        record["sem_seg_file_name"] = os.path.join(
            paths["sem_seg_root"], os.path.basename(record["pan_seg_file_name"])
        )
    return dicts


def load_coco_panoptic_without_refcocog_val(
    paths: Dict[str, str], meta: dict, root: Path
) -> List[dict]:
    """COCO train panoptic without the images of RefCOCOg-umd val (X-Decoder's
    `filtrefgumdval` split, the training set of OpenWorldSAM, App. A.1)."""
    excluded = refcocog_umd_image_ids(root, "val")
    return [d for d in load_coco_panoptic_with_sem_seg(paths, meta) if d["image_id"] not in excluded]


def load_coco_instances(paths: Dict[str, str], meta: dict) -> List[dict]:
    """Instance dicts with category ids mapped to COCO's 80 contiguous thing ids."""
    require(paths["image_root"], DOWNLOAD)
    require(paths["json_file"], DOWNLOAD + " (annotations_trainval2017.zip)")
    return coco_instance_dicts(
        paths["json_file"], paths["image_root"], meta["thing_dataset_id_to_contiguous_id"]
    )


def register_all_coco(root: Path) -> None:
    """Register `openseg_coco_2017_{train,val}_{panoptic,instance}` and
    `openseg_coco_2017_train_panoptic_filtrefgumdval` (lazy: no disk access)."""
    panoptic_meta = coco_panoptic_metadata()
    instance_meta = coco_instance_metadata()
    for split in SPLITS:
        paths = coco_paths(root, split)
        register_lazy(
            f"openseg_coco_2017_{split}_panoptic",
            partial(load_coco_panoptic_with_sem_seg, paths, panoptic_meta),
            **panoptic_meta,
            **paths,
            evaluators=["panoptic", "semantic", "instance"],
        )
        if split == "train":
            register_lazy(
                "openseg_coco_2017_train_panoptic_filtrefgumdval",
                partial(load_coco_panoptic_without_refcocog_val, paths, panoptic_meta, root),
                **panoptic_meta,
                **paths,
                evaluators=["panoptic", "semantic", "instance"],
            )
        register_lazy(
            f"openseg_coco_2017_{split}_instance",
            partial(load_coco_instances, paths, panoptic_meta),
            **instance_meta,
            image_root=paths["image_root"],
            json_file=paths["json_file"],
            evaluators=["instance"],
        )
