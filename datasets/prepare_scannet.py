"""ScanNet 2D semantic segmentation of the validation scenes, ScanNet-20 and ScanNet-40 (NYUv2).

Reads  $OPENSEG_DATASETS/scannet/scannet_frames_25k/<scene>/{color/<frame>.jpg,label/<frame>.png}
       (label pixels: ScanNet raw category ids, 0 = unannotated), scannetv2-labels.combined.tsv
       (columns "id" and "nyu40id") and scannetv2_val.txt (one scene per line), all under
       $OPENSEG_DATASETS/scannet (override with --frames / --tsv / --scenes).
       --label-space nyu40 reads label PNGs that already hold nyu40ids.
Writes $OPENSEG_DATASETS/scannet/images_detectron2/val/<scene>_<frame>.jpg and
       annotations_detectron2/scannet{20,40}_val/<scene>_<frame>.png (unlisted -> 255)
"""

import csv
import shutil
from pathlib import Path
from typing import Dict

import numpy as np
from PIL import Image
from tqdm import tqdm

from openseg.data.datasets.common import prepare_parser, remap_labels
from openseg.data.datasets.scannet import SCANNET_20_NYU40_IDS

NYU40_TO_SCANNET40 = {k: k - 1 for k in range(1, 41)}
NYU40_TO_SCANNET20 = {nyu40: i for i, nyu40 in enumerate(SCANNET_20_NYU40_IDS)}


def read_raw_to_nyu40(tsv: Path) -> Dict[int, int]:
    """ScanNet raw category id -> nyu40id from scannetv2-labels.combined.tsv."""
    with open(tsv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or not {"id", "nyu40id"} <= rows[0].keys():
        raise ValueError(f"{tsv} must be tab-separated with columns 'id' and 'nyu40id'")
    return {int(row["id"]): int(row["nyu40id"]) for row in rows if row["nyu40id"].strip()}


def convert(scannet: Path, frames: Path, scenes_file: Path, raw_to_nyu40: Dict[int, int]) -> int:
    for path in (frames, scenes_file):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found (ScanNet download: scannet_frames_25k, scannetv2_val.txt)"
            )
    out_images = scannet / "images_detectron2" / "val"
    out_images.mkdir(parents=True, exist_ok=True)
    outputs = {
        size: (scannet / "annotations_detectron2" / f"scannet{size}_val", mapping)
        for size, mapping in ((20, NYU40_TO_SCANNET20), (40, NYU40_TO_SCANNET40))
    }
    for out_dir, _ in outputs.values():
        out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for scene in tqdm(scenes_file.read_text().split(), desc="ScanNet val scenes"):
        label_files = sorted((frames / scene / "label").glob("*.png"))
        if not label_files:
            raise FileNotFoundError(f"no label PNGs in {frames / scene / 'label'}")
        for label_file in label_files:
            image = frames / scene / "color" / f"{label_file.stem}.jpg"
            if not image.exists():
                raise FileNotFoundError(f"{image} (the color frame of {label_file}) is missing")
            nyu40 = np.asarray(Image.open(label_file), dtype=np.int64)
            if raw_to_nyu40 is not None:
                nyu40 = remap_labels(nyu40, raw_to_nyu40, 0)
            name = f"{scene}_{label_file.stem}"
            for out_dir, mapping in outputs.values():
                Image.fromarray(remap_labels(nyu40, mapping, 255).astype(np.uint8)).save(
                    out_dir / f"{name}.png"
                )
            shutil.copyfile(image, out_images / f"{name}.jpg")
            count += 1
    return count


def main() -> None:
    parser = prepare_parser(__doc__)
    parser.add_argument("--frames", type=Path, help="scannet_frames_25k folder")
    parser.add_argument("--tsv", type=Path, help="scannetv2-labels.combined.tsv")
    parser.add_argument("--scenes", type=Path, help="scannetv2_val.txt")
    parser.add_argument("--label-space", choices=("raw", "nyu40"), default="raw")
    args = parser.parse_args()
    scannet = args.root / "scannet"
    raw_to_nyu40 = None
    if args.label_space == "raw":
        tsv = args.tsv or scannet / "scannetv2-labels.combined.tsv"
        if not tsv.exists():
            raise FileNotFoundError(
                f"{tsv} not found (ScanNet download) or pass --label-space nyu40"
            )
        raw_to_nyu40 = read_raw_to_nyu40(tsv)
    frames = args.frames or scannet / "scannet_frames_25k"
    count = convert(scannet, frames, args.scenes or scannet / "scannetv2_val.txt", raw_to_nyu40)
    print(f"ScanNet val: {count} frames")


if __name__ == "__main__":
    main()
