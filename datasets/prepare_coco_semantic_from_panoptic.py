#!/usr/bin/env python3
"""Write COCO semantic maps (PNG of contiguous ids, 255 = unlabelled) from panoptic PNGs.

Semantic segmentation training and evaluation on COCO (Mask2Former, Cheng et al. CVPR 2022)
use 133-class maps derived from the panoptic annotation: every pixel of a segment gets its
category's contiguous id (crowd regions included, they still show the class), void pixels
get 255. Output: $OPENSEG_DATASETS/coco/panoptic_semseg_{train,val}2017/<name>.png.

Usage (openseg installed or on PYTHONPATH):
    python datasets/prepare_coco_semantic_from_panoptic.py [--root DIR] [--splits val] [--workers N]
"""

import argparse
import json
import os
from multiprocessing import Pool
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
from panopticapi.utils import rgb2id
from PIL import Image
from tqdm import tqdm

from openseg.data.datasets.coco import coco_panoptic_metadata, coco_paths
from openseg.data.datasets.common import dataset_root, require
from openseg.data.mappers import IGNORE_LABEL, AnnotationError, panoptic_to_semantic


def _convert(job: Tuple[str, str, list, Dict[int, int]]) -> None:
    pan_png, out_png, segments_info, id_to_contiguous = job
    pan_ids = rgb2id(np.asarray(Image.open(pan_png).convert("RGB")))
    try:
        semantic = panoptic_to_semantic(pan_ids, segments_info, id_to_contiguous, IGNORE_LABEL)
    except AnnotationError as error:
        raise AnnotationError(f"{pan_png}: {error}") from error
    Image.fromarray(semantic).save(out_png)


def prepare_split(root: Path, split: str, workers: int) -> None:
    paths = coco_paths(root, split)
    panoptic_json = require(paths["panoptic_json"], "download COCO panoptic annotations")
    panoptic_root = require(paths["panoptic_root"], "unzip the panoptic PNG archives")
    out_dir = Path(paths["sem_seg_root"])
    id_to_contiguous = coco_panoptic_metadata()["stuff_dataset_id_to_contiguous_id"]
    annotations = json.loads(Path(panoptic_json).read_text())["annotations"]
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        (
            str(panoptic_root / ann["file_name"]),
            str(out_dir / ann["file_name"]),
            ann["segments_info"],
            id_to_contiguous,
        )
        for ann in annotations
    ]
    if workers <= 1:
        for job in tqdm(jobs, desc=split):
            _convert(job)
        return
    with Pool(workers) as pool:
        for _ in tqdm(
            pool.imap_unordered(_convert, jobs, chunksize=16), total=len(jobs), desc=split
        ):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=dataset_root(), help="dataset root")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    for split in args.splits:
        prepare_split(args.root, split, args.workers)


if __name__ == "__main__":
    main()
