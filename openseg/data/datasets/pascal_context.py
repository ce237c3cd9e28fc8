"""Pascal Context semantic segmentation on the VOC2010 val images (5105): the 59 frequent
classes (PC-59) and the full 459-class vocabulary (PC-459), as made by
datasets/prepare_pascal_context.py from the official `trainval/*.mat` + `labels.txt`:
`VOCdevkit/VOC2010/annotations_detectron2/pc59_val/*.png` (255 = not one of the 59) and
`.../pc459_val/*.tif` (uint16, 65535 = unlabeled). PC-459 names are read from
`VOCdevkit/VOC2010/pc459_classes.json`, written by the same script from labels.txt.

PC-459 train (VOC2010 train images, 4998; one of OSM's training sets, Yu et al. Sec. 3.3):
`.../pc459_train/*.tif`, the same ids with "unknown" also ignored, as OSM's release trains.
"""

import json
from functools import partial
from pathlib import Path
from typing import Dict

from .common import register_semantic, require
from .pascal_voc import NATURAL_SYNONYMS

# the 59 most frequent classes, in the (alphabetical) order of their contiguous ids; the
# official labels.txt tokens differ only for "pottedplant" and "tvmonitor"
PASCAL_CONTEXT_59_CLASSES = [
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person",
    "plate", "platform", "potted plant", "road", "rock", "sheep", "shelves", "sidewalk", "sign",
    "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tv monitor", "wall",
    "water", "window", "wood",
]  # fmt: skip
PASCAL_CONTEXT_SOURCE_NAMES = {"potted plant": "pottedplant", "tv monitor": "tvmonitor"}
_SYNONYMS = {**NATURAL_SYNONYMS, "sidewalk": ["pavement"]}
PASCAL_CONTEXT_59_SYNONYMS = [
    [name] + _SYNONYMS.get(name, []) for name in PASCAL_CONTEXT_59_CLASSES
]
PC459_CLASSES_FILE = "pc459_classes.json"
PC459_IGNORE_LABEL = 65535  # 459 classes do not fit an 8-bit label image
_PREPARE = "python datasets/prepare_pascal_context.py"


def load_pascal_context_459_classes(root: Path) -> Dict:
    """PC-459 vocabulary (lazy metadata): names in contiguous-id order from the prepared JSON."""
    path = require(root / "VOCdevkit" / "VOC2010" / PC459_CLASSES_FILE, _PREPARE)
    with open(path) as f:
        names = [entry["name"] for entry in json.load(f)]
    return {"stuff_classes": names, "synonyms": [[name] for name in names]}


def register_all_pascal_context(root: Path) -> None:
    """Register openseg_pascal_context59_sem_seg_val and
    openseg_pascal_context459_sem_seg_{train,val}."""
    root = Path(root)
    voc = root / "VOCdevkit" / "VOC2010"
    register_semantic(
        "openseg_pascal_context59_sem_seg_val",
        voc / "JPEGImages",
        voc / "annotations_detectron2" / "pc59_val",
        _PREPARE,
        stuff_classes=list(PASCAL_CONTEXT_59_CLASSES),
        synonyms=[list(s) for s in PASCAL_CONTEXT_59_SYNONYMS],
    )
    for split in ("train", "val"):
        register_semantic(
            f"openseg_pascal_context459_sem_seg_{split}",
            voc / "JPEGImages",
            voc / "annotations_detectron2" / f"pc459_{split}",
            _PREPARE,
            ignore_label=PC459_IGNORE_LABEL,
            lazy_metadata=partial(load_pascal_context_459_classes, root),
        )
