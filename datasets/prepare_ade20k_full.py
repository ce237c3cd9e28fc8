"""ADE20K-Full (847 classes) semantic labels, images and class list, as in MaskFormer
(Cheng et al., NeurIPS 2021, Sec. 4): the classes of the full ADE20K index that occur in both
the training and the validation images.

Reads  $OPENSEG_DATASETS/ADE20K_2021_17_01/index_ade20k.pkl and images/ADE/{training,validation}/
       **/<name>.jpg + <name>_seg.png (class of a pixel = R / 10 * 256 + G, 0 = unlabeled,
       k = index_ade20k["objectnames"][k - 1])
Writes $OPENSEG_DATASETS/ADE20K_2021_17_01/classes_847.json,
       images_detectron2/{training,validation}/<name>.jpg and
       annotations_detectron2/{training,validation}/<name>.tif (uint16, 65535 = ignore)

--classes-json replaces the derived class selection by a given list of objectnames indices.
"""

import json
import pickle
import shutil
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image
from tqdm import tqdm

from openseg.data.datasets.ade20k import ADE_FULL_CLASSES_FILE, ADE_FULL_IGNORE_LABEL
from openseg.data.datasets.common import prepare_parser, remap_labels

SPLIT_DIRS = ("training", "validation")
EXPECTED_CLASSES = 847


def classes_in_both_splits(index: Dict) -> List[int]:
    """0-based objectnames indices present in at least one training and one validation image."""
    presence = np.asarray(index["objectPresence"]) > 0  # (classes, images)
    folders = [str(folder) for folder in index["folder"]]
    in_split = {
        split: np.array([f"/{split}" in folder for folder in folders]) for split in SPLIT_DIRS
    }
    both = presence[:, in_split["training"]].any(axis=1) & presence[:, in_split["validation"]].any(
        axis=1
    )
    return [int(i) for i in np.nonzero(both)[0]]


def class_map(seg_png: np.ndarray) -> np.ndarray:
    """Full-ADE class value (objectnames index + 1, 0 = unlabeled) of every pixel."""
    return seg_png[..., 0].astype(np.int64) // 10 * 256 + seg_png[..., 1].astype(np.int64)


def convert(ade_full: Path, classes_json: Path = None) -> None:
    index_file = ade_full / "index_ade20k.pkl"
    if not index_file.exists():
        raise FileNotFoundError(
            f"{index_file} not found: unpack ADE20K_2021_17_01.zip into {ade_full.parent}"
        )
    with open(index_file, "rb") as f:
        index = pickle.load(f)
    if classes_json is not None:
        with open(classes_json) as f:
            selected = [int(entry["ade_index"]) for entry in json.load(f)]
    else:
        selected = classes_in_both_splits(index)
    if len(selected) != EXPECTED_CLASSES:
        print(
            f"warning: {len(selected)} classes selected, "
            f"the ADE20K-847 benchmark has {EXPECTED_CLASSES}"
        )
    names = [str(index["objectnames"][i]) for i in selected]
    with open(ade_full / ADE_FULL_CLASSES_FILE, "w") as f:
        json.dump(
            [{"id": k, "name": n, "ade_index": i} for k, (i, n) in enumerate(zip(selected, names))],
            f,
        )
    to_contiguous = {ade_index + 1: k for k, ade_index in enumerate(selected)}
    for folder, filename in tqdm(list(zip(index["folder"], index["filename"])), desc="ADE20K-Full"):
        split = next((s for s in SPLIT_DIRS if f"/{s}" in str(folder)), None)
        if split is None:
            continue
        image = ade_full.parent / str(folder) / str(filename)
        if not image.exists():  # index folders start at "ADE20K_2021_17_01/images/..."
            image = ade_full / "images" / str(folder).split("/images/", 1)[-1] / str(filename)
        seg = image.with_name(image.stem + "_seg.png")
        for path in (image, seg):
            if not path.exists():
                raise FileNotFoundError(f"{path} listed in {index_file} is missing")
        labels = remap_labels(
            class_map(np.asarray(Image.open(seg).convert("RGB"))),
            to_contiguous,
            ADE_FULL_IGNORE_LABEL,
        )
        for kind in ("images_detectron2", "annotations_detectron2"):
            (ade_full / kind / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels.astype(np.uint16)).save(
            ade_full / "annotations_detectron2" / split / f"{image.stem}.tif"
        )
        shutil.copyfile(image, ade_full / "images_detectron2" / split / image.name)


def main() -> None:
    parser = prepare_parser(__doc__)
    parser.add_argument("--classes-json", type=Path, help="list of {'ade_index': i} to use instead")
    args = parser.parse_args()
    convert(args.root / "ADE20K_2021_17_01", args.classes_json)


if __name__ == "__main__":
    main()
