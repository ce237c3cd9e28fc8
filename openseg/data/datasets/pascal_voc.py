"""Pascal VOC 2012 semantic segmentation without background (VOC-20), as in open-vocabulary
segmentation benchmarks: `VOCdevkit/VOC2012/JPEGImages` + `annotations_detectron2/val` made by
datasets/prepare_pascal_voc.py (background and boundaries -> 255, class k -> k - 1).
"""

from pathlib import Path

from .common import register_semantic

# VOC label order 1..20 (official tokens "diningtable", "pottedplant", "tvmonitor" spelt out)
PASCAL_VOC_20_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
    "train", "tv monitor",
]  # fmt: skip
NATURAL_SYNONYMS = {
    "aeroplane": ["airplane"],
    "bicycle": ["bike"],
    "motorbike": ["motorcycle"],
    "sofa": ["couch"],
    "tv monitor": ["television", "monitor"],
}
PASCAL_VOC_20_SYNONYMS = [[name] + NATURAL_SYNONYMS.get(name, []) for name in PASCAL_VOC_20_CLASSES]


def register_all_pascal_voc(root: Path) -> None:
    """Register openseg_pascal_voc20_sem_seg_val."""
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    register_semantic(
        "openseg_pascal_voc20_sem_seg_val",
        voc / "JPEGImages",
        voc / "annotations_detectron2" / "val",
        "python datasets/prepare_pascal_voc.py",
        stuff_classes=list(PASCAL_VOC_20_CLASSES),
        synonyms=[list(s) for s in PASCAL_VOC_20_SYNONYMS],
    )
