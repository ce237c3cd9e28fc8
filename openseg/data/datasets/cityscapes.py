"""Cityscapes fine panoptic (19 evaluated classes) and instance segmentation (8 thing classes),
laid out as detectron2 expects: `cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png`, the
official `cityscapes/gtFine/<split>/<city>/*_gtFine_instanceIds.png` and, made by
datasets/prepare_cityscapes.py, `cityscapes/gtFine/cityscapes_panoptic_<split>{.json,/}` plus
`*_gtFine_labelTrainIds.png` next to the official gtFine files.

Instance segmentation (`openseg_cityscapes_fine_instance_seg_{train,val}`, the datasets of
Mask2Former's released Cityscapes instance configs) reads the instanceIds PNGs directly, as
detectron2's `load_cityscapes_instances(from_json=False)`: a value v >= 1000 is instance
v % 1000 of label v // 1000, a value v < 1000 of a thing label a crowd ("group") region; only
the 8 evaluated thing classes are kept. Mask2Former registers detectron2's polygon reading
(`from_json=True`) instead; the PNGs are rendered from those polygons, so the masks are the
same up to rasterisation. Evaluation: `cityscapes_instance` (AP, AP50 of the official
cityscapesscripts, as Mask2Former's CityscapesInstanceEvaluator).
"""

import multiprocessing
from functools import partial
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

import numpy as np
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools import mask as mask_util

from .common import DatasetNotFoundError, load_panoptic_json, register_lazy, require


class CityscapesClass(NamedTuple):
    name: str
    label_id: int  # value in the official *_labelIds.png / *_instanceIds.png
    is_thing: bool


# the 19 classes evaluated by the benchmark, in trainId order (trainId = position)
CITYSCAPES_19 = [
    CityscapesClass("road", 7, False),
    CityscapesClass("sidewalk", 8, False),
    CityscapesClass("building", 11, False),
    CityscapesClass("wall", 12, False),
    CityscapesClass("fence", 13, False),
    CityscapesClass("pole", 17, False),
    CityscapesClass("traffic light", 19, False),
    CityscapesClass("traffic sign", 20, False),
    CityscapesClass("vegetation", 21, False),
    CityscapesClass("terrain", 22, False),
    CityscapesClass("sky", 23, False),
    CityscapesClass("person", 24, True),
    CityscapesClass("rider", 25, True),
    CityscapesClass("car", 26, True),
    CityscapesClass("truck", 27, True),
    CityscapesClass("bus", 28, True),
    CityscapesClass("train", 31, True),
    CityscapesClass("motorcycle", 32, True),
    CityscapesClass("bicycle", 33, True),
]
CITYSCAPES_19_CLASSES = [c.name for c in CITYSCAPES_19]
# natural synonyms only; classes without one keep just their name
_SYNONYMS = {
    "sidewalk": ["pavement"],
    "person": ["pedestrian"],
    "motorcycle": ["motorbike"],
    "bicycle": ["bike"],
}
CITYSCAPES_19_SYNONYMS = [[name] + _SYNONYMS.get(name, []) for name in CITYSCAPES_19_CLASSES]
CITYSCAPES_LABEL_DIVISOR = 1000  # instanceIds.png: label_id * 1000 + instance index
_PREPARE = "python datasets/prepare_cityscapes.py"


def cityscapes_panoptic_metadata() -> Dict:
    """Metadata shared by both splits (Mask2Former convention: contiguous id = trainId for
    things and stuff alike; `stuff_classes` lists all 19 classes, `thing_classes` the 8 things)."""
    return {
        "thing_classes": [c.name for c in CITYSCAPES_19 if c.is_thing],
        "stuff_classes": list(CITYSCAPES_19_CLASSES),
        "thing_dataset_id_to_contiguous_id": {
            c.label_id: i for i, c in enumerate(CITYSCAPES_19) if c.is_thing
        },
        "stuff_dataset_id_to_contiguous_id": {c.label_id: i for i, c in enumerate(CITYSCAPES_19)},
        "synonyms": [list(s) for s in CITYSCAPES_19_SYNONYMS],
        "ignore_label": 255,
        "label_divisor": CITYSCAPES_LABEL_DIVISOR,
        "evaluators": ["panoptic", "semantic", "instance"],
    }


def load_cityscapes_fine_panoptic(root: Path, split: str) -> List[dict]:
    """Panoptic dicts (with `sem_seg_file_name` = labelTrainIds PNG) of one split."""
    cityscapes = root / "cityscapes"
    image_dir = require(cityscapes / "leftImg8bit" / split, "download leftImg8bit_trainvaltest.zip")

    def locate(image: dict) -> Tuple[Path, Path]:
        city = image["id"].split("_")[0]
        sem_seg = cityscapes / "gtFine" / split / city / f"{image['id']}_gtFine_labelTrainIds.png"
        return image_dir / city / image["file_name"], sem_seg

    return load_panoptic_json(
        cityscapes / "gtFine" / f"cityscapes_panoptic_{split}.json",
        cityscapes / "gtFine" / f"cityscapes_panoptic_{split}",
        locate,
        cityscapes_panoptic_metadata(),
        _PREPARE,
    )


CITYSCAPES_THINGS = [c for c in CITYSCAPES_19 if c.is_thing]
_IMAGE_SUFFIX = "_leftImg8bit.png"
_INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
_DOWNLOAD = "download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip"


def cityscapes_instance_metadata() -> Dict:
    """The 8 evaluated thing classes (contiguous id = position, as Mask2Former's 8-class
    instance models predict them); `stuff_classes` lists the same 8 (openseg convention: every
    class the model predicts)."""
    names = [c.name for c in CITYSCAPES_THINGS]
    synonyms = dict(zip(CITYSCAPES_19_CLASSES, CITYSCAPES_19_SYNONYMS))
    return {
        "thing_classes": names,
        "stuff_classes": list(names),
        "thing_dataset_id_to_contiguous_id": {c.label_id: i for i, c in enumerate(CITYSCAPES_THINGS)},
        "synonyms": [list(synonyms[n]) for n in names],
        "ignore_label": 255,
        "evaluators": ["cityscapes_instance"],
    }


def cityscapes_instance_annotations(instance_ids: np.ndarray) -> List[dict]:
    """Annotations (contiguous `category_id`, XYXY box, compressed-RLE `segmentation`,
    `iscrowd` for the < 1000 group regions) of one instanceIds map."""
    to_contiguous = {c.label_id: i for i, c in enumerate(CITYSCAPES_THINGS)}
    annotations = []
    for value in np.unique(instance_ids[instance_ids >= min(to_contiguous)]):
        label_id = int(value) // CITYSCAPES_LABEL_DIVISOR if value >= CITYSCAPES_LABEL_DIVISOR else int(value)
        if label_id not in to_contiguous:
            continue
        mask = np.asfortranarray(instance_ids == value, dtype=np.uint8)
        rows, cols = np.nonzero(mask)
        rle = mask_util.encode(mask)
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append(
            {
                "category_id": to_contiguous[label_id],
                "iscrowd": int(value < CITYSCAPES_LABEL_DIVISOR),
                "bbox": [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1],
                "bbox_mode": BoxMode.XYXY_ABS,
                "segmentation": rle,
            }
        )
    return annotations


def _instance_record(files: Tuple[str, str]) -> dict:
    image_file, instance_file = files
    instance_ids = np.asarray(Image.open(instance_file), dtype=np.int32)
    return {
        "file_name": image_file,
        "image_id": Path(image_file).name[: -len(_IMAGE_SUFFIX)],
        "height": int(instance_ids.shape[0]),
        "width": int(instance_ids.shape[1]),
        "instance_ids_file_name": instance_file,
        "annotations": cityscapes_instance_annotations(instance_ids),
    }


def load_cityscapes_fine_instances(root: Path, split: str) -> List[dict]:
    """Instance dicts of one split: every `<city>/*_leftImg8bit.png` with its
    `*_gtFine_instanceIds.png` (read in parallel, as detectron2's loader, for whole splits)."""
    cityscapes = Path(root) / "cityscapes"
    image_dir = require(cityscapes / "leftImg8bit" / split, _DOWNLOAD)
    gt_dir = require(cityscapes / "gtFine" / split, _DOWNLOAD)
    files = []
    for image in sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}")):
        prefix = image.name[: -len(_IMAGE_SUFFIX)]
        instance = require(gt_dir / image.parent.name / f"{prefix}{_INSTANCE_SUFFIX}", _DOWNLOAD)
        files.append((str(image), str(instance)))
    if not files:
        raise DatasetNotFoundError(f"No <city>/*{_IMAGE_SUFFIX} images in {image_dir}; {_DOWNLOAD}.")
    if len(files) < 64:
        return [_instance_record(f) for f in files]
    with multiprocessing.Pool(processes=max(multiprocessing.cpu_count() // 2, 4)) as pool:
        return pool.map(_instance_record, files, chunksize=16)


def register_all_cityscapes(root: Path) -> None:
    """Register openseg_cityscapes_fine_panoptic_{train,val} and
    openseg_cityscapes_fine_instance_seg_{train,val}."""
    root = Path(root)
    for split in ("train", "val"):
        cityscapes = root / "cityscapes"
        register_lazy(
            f"openseg_cityscapes_fine_instance_seg_{split}",
            partial(load_cityscapes_fine_instances, root, split),
            image_root=str(cityscapes / "leftImg8bit" / split),
            gt_dir=str(cityscapes / "gtFine" / split),
            **cityscapes_instance_metadata(),
        )
        register_lazy(
            f"openseg_cityscapes_fine_panoptic_{split}",
            partial(load_cityscapes_fine_panoptic, root, split),
            image_root=str(cityscapes / "leftImg8bit" / split),
            gt_dir=str(cityscapes / "gtFine" / split),
            panoptic_root=str(cityscapes / "gtFine" / f"cityscapes_panoptic_{split}"),
            panoptic_json=str(cityscapes / "gtFine" / f"cityscapes_panoptic_{split}.json"),
            **cityscapes_panoptic_metadata(),
        )
