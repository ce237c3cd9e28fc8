"""Cityscapes fine panoptic (19 evaluated classes), laid out as detectron2 expects:
`cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png` and, made by
datasets/prepare_cityscapes.py, `cityscapes/gtFine/cityscapes_panoptic_<split>{.json,/}` plus
`*_gtFine_labelTrainIds.png` next to the official gtFine files.
"""

from functools import partial
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

from .common import load_panoptic_json, register_lazy, require


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


def register_all_cityscapes(root: Path) -> None:
    """Register openseg_cityscapes_fine_panoptic_{train,val}."""
    root = Path(root)
    for split in ("train", "val"):
        cityscapes = root / "cityscapes"
        register_lazy(
            f"openseg_cityscapes_fine_panoptic_{split}",
            partial(load_cityscapes_fine_panoptic, root, split),
            image_root=str(cityscapes / "leftImg8bit" / split),
            gt_dir=str(cityscapes / "gtFine" / split),
            panoptic_root=str(cityscapes / "gtFine" / f"cityscapes_panoptic_{split}"),
            panoptic_json=str(cityscapes / "gtFine" / f"cityscapes_panoptic_{split}.json"),
            **cityscapes_panoptic_metadata(),
        )
