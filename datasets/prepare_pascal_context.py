"""Pascal Context (Mottaghi et al., CVPR 2014) labels: PC-59 and PC-459 val, PC-459 train.

Reads  $OPENSEG_DATASETS/VOCdevkit/VOC2010/trainval/<id>.mat (key "LabelMap") and
       labels.txt ("<id>: <name>" per class), both from the official trainval.tar.gz, and the
       image lists VOC2010/ImageSets/Main/{train,val}.txt (4998 / 5105 images; --split-dir
       to change)
Writes $OPENSEG_DATASETS/VOCdevkit/VOC2010/pc459_classes.json,
       annotations_detectron2/pc59_val/<id>.png (59 classes, others -> 255),
       annotations_detectron2/pc459_val/<id>.tif (uint16, 0 = unlabeled -> 65535) and
       annotations_detectron2/pc459_train/<id>.tif (the same, and "unknown" -> 65535: OSM's
       release ignores that class in training, train/data.py ignore_value_list [65535, 430])
"""

import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image
from scipy.io import loadmat
from tqdm import tqdm

from openseg.data.datasets.common import prepare_parser, remap_labels
from openseg.data.datasets.pascal_context import (
    PASCAL_CONTEXT_59_CLASSES,
    PASCAL_CONTEXT_SOURCE_NAMES,
    PC459_CLASSES_FILE,
    PC459_IGNORE_LABEL,
)


def read_labels(path: Path) -> List[Tuple[int, str]]:
    """(label id, name) pairs of labels.txt, in id order."""
    labels = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(.+?)\s*", line)
        if match is None:
            raise ValueError(f"{path}:{line_number}: expected '<id>: <name>', got {line!r}")
        labels.append((int(match.group(1)), match.group(2)))
    return sorted(labels)


def label_mappings(
    labels: List[Tuple[int, str]], with_pc59: bool = True
) -> Tuple[Dict[int, int], Dict[int, int]]:
    """Official label id -> PC-59 contiguous id (empty without `with_pc59`), and -> PC-459
    contiguous id."""
    ids_by_name = {name: label_id for label_id, name in labels}
    pc59 = {}
    for contiguous, name in enumerate(PASCAL_CONTEXT_59_CLASSES if with_pc59 else ()):
        source = PASCAL_CONTEXT_SOURCE_NAMES.get(name, name)
        if source not in ids_by_name:
            raise ValueError(f"labels.txt has no class '{source}' (a PC-59 class)")
        pc59[ids_by_name[source]] = contiguous
    pc459 = {label_id: contiguous for contiguous, (label_id, _) in enumerate(labels)}
    return pc59, pc459


# classes no training target is made of (OSM's release: PC-459 id 430 = "unknown")
TRAIN_IGNORED_NAMES = ("unknown",)


def convert(voc2010: Path, split_file: Path, split: str = "val") -> int:
    """Write the label maps of the images in `split_file`: PC-59 and PC-459 for "val",
    PC-459 without TRAIN_IGNORED_NAMES for "train"; returns the number of images."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    labels_file = voc2010 / "labels.txt"
    for path in (labels_file, voc2010 / "trainval", split_file):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: unpack the Pascal Context trainval.tar.gz into {voc2010}"
            )
    labels = read_labels(labels_file)
    pc59, pc459 = label_mappings(labels, with_pc59=split == "val")
    with open(voc2010 / PC459_CLASSES_FILE, "w") as f:
        json.dump([{"id": k, "name": name, "label_id": i} for k, (i, name) in enumerate(labels)], f)
    if split == "train":
        ignored = {label_id for label_id, name in labels if name in TRAIN_IGNORED_NAMES}
        pc459 = {label_id: k for label_id, k in pc459.items() if label_id not in ignored}
    out59 = voc2010 / "annotations_detectron2" / "pc59_val"
    out459 = voc2010 / "annotations_detectron2" / f"pc459_{split}"
    if split == "val":
        out59.mkdir(parents=True, exist_ok=True)
    out459.mkdir(parents=True, exist_ok=True)
    ids = split_file.read_text().split()
    for image_id in tqdm(ids, desc=f"Pascal Context {split}"):
        mat_file = voc2010 / "trainval" / f"{image_id}.mat"
        if not mat_file.exists():
            raise FileNotFoundError(f"{mat_file} listed in {split_file} is missing")
        label_map = np.asarray(loadmat(mat_file)["LabelMap"], dtype=np.int64)
        if split == "val":
            Image.fromarray(remap_labels(label_map, pc59, 255).astype(np.uint8)).save(
                out59 / f"{image_id}.png"
            )
        Image.fromarray(remap_labels(label_map, pc459, PC459_IGNORE_LABEL).astype(np.uint16)).save(
            out459 / f"{image_id}.tif"
        )
    return len(ids)


def main() -> None:
    parser = prepare_parser(__doc__)
    parser.add_argument(
        "--split-dir", type=Path,
        help="folder of the image id lists <split>.txt (default VOC2010/ImageSets/Main)",
    )
    parser.add_argument(
        "--splits", nargs="+", choices=("train", "val"), default=["train", "val"],
        help="splits to convert (default both)",
    )
    args = parser.parse_args()
    voc2010 = args.root / "VOCdevkit" / "VOC2010"
    split_dir = args.split_dir or voc2010 / "ImageSets" / "Main"
    for split in args.splits:
        count = convert(voc2010, split_dir / f"{split}.txt", split)
        print(f"Pascal Context {split}: {count} label maps")


if __name__ == "__main__":
    main()
