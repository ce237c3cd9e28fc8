"""ScanNet 2D semantic segmentation on frames of the validation scenes (Dai et al., CVPR 2017),
with the 20 benchmark classes and the 40 NYUv2 classes: `scannet/images_detectron2/val/*.jpg`
+ `scannet/annotations_detectron2/scannet{20,40}_val/*.png`, made by datasets/prepare_scannet.py
from the frames' ScanNet label ids through scannetv2-labels.combined.tsv.
"""

from pathlib import Path

from .common import register_semantic

# NYUv2 40-class set, in nyu40id order (nyu40id k -> contiguous id k - 1)
SCANNET_40_CLASSES = [
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "other structure", "other furniture", "other prop",
]  # fmt: skip
# the 20 classes of the ScanNet benchmark, as nyu40ids
SCANNET_20_NYU40_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39]
SCANNET_20_CLASSES = [SCANNET_40_CLASSES[i - 1] for i in SCANNET_20_NYU40_IDS]
_SYNONYMS = {
    "sofa": ["couch"],
    "bookshelf": ["bookcase"],
    "refrigerator": ["fridge"],
    "television": ["tv"],
    "clothes": ["clothing"],
    "night stand": ["nightstand", "bedside table"],
}
SCANNET_40_SYNONYMS = [[name] + _SYNONYMS.get(name, []) for name in SCANNET_40_CLASSES]
SCANNET_20_SYNONYMS = [SCANNET_40_SYNONYMS[i - 1] for i in SCANNET_20_NYU40_IDS]


def register_all_scannet(root: Path) -> None:
    """Register openseg_scannet20_sem_seg_val and openseg_scannet40_sem_seg_val."""
    scannet = Path(root) / "scannet"
    for size, classes, synonyms in (
        (20, SCANNET_20_CLASSES, SCANNET_20_SYNONYMS),
        (40, SCANNET_40_CLASSES, SCANNET_40_SYNONYMS),
    ):
        register_semantic(
            f"openseg_scannet{size}_sem_seg_val",
            scannet / "images_detectron2" / "val",
            scannet / "annotations_detectron2" / f"scannet{size}_val",
            "python datasets/prepare_scannet.py",
            stuff_classes=list(classes),
            synonyms=[list(s) for s in synonyms],
        )
