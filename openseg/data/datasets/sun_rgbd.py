"""SUN RGB-D semantic segmentation, 37 classes (Song et al., CVPR 2015), test split (5050
images) used as the validation set: `sun_rgbd/images_detectron2/val/*.jpg` +
`sun_rgbd/annotations_detectron2/val/*.png` made by datasets/prepare_sun_rgbd.py
(official 37-class label k -> k - 1, 0 = unlabeled -> 255).
"""

from pathlib import Path

from .common import register_semantic

SUN_RGBD_37_CLASSES = [
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "fridge", "tv", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag",
]  # fmt: skip
_SYNONYMS = {
    "sofa": ["couch"],
    "bookshelf": ["bookcase"],
    "fridge": ["refrigerator"],
    "tv": ["television"],
    "clothes": ["clothing"],
    "night stand": ["nightstand", "bedside table"],
    "bathtub": ["bath tub"],
}
SUN_RGBD_37_SYNONYMS = [[name] + _SYNONYMS.get(name, []) for name in SUN_RGBD_37_CLASSES]


def register_all_sun_rgbd(root: Path) -> None:
    """Register openseg_sun_rgbd37_sem_seg_val."""
    sun = Path(root) / "sun_rgbd"
    register_semantic(
        "openseg_sun_rgbd37_sem_seg_val",
        sun / "images_detectron2" / "val",
        sun / "annotations_detectron2" / "val",
        "python datasets/prepare_sun_rgbd.py",
        stuff_classes=list(SUN_RGBD_37_CLASSES),
        synonyms=[list(s) for s in SUN_RGBD_37_SYNONYMS],
    )
