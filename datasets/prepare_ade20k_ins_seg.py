"""ADE20K-150 instance annotations (100 thing classes) in COCO format.

Reads  $OPENSEG_DATASETS/ADEChallengeData2016/{images,annotations_instance}/<split>/ and
       ade20k_instance_catid_mapping.txt (from github.com/CSAILVision/ADE20K, utils/)
Writes $OPENSEG_DATASETS/ADEChallengeData2016/ade20k_instance_{train,val}.json

Category ids are ADE-150 contiguous ids, shared with the panoptic annotations; masks are RLE.
"""

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image
from tqdm import tqdm

from openseg.data.datasets.ade20k import (
    ADE20K_150_CLASSES,
    ADE20K_150_THING_IDS,
    iter_ade20k_instances,
    read_instance_category_mapping,
)
from openseg.data.datasets.common import prepare_parser

SPLITS = {"train": "training", "val": "validation"}


def convert_split(ade: Path, split: str, category_mapping: dict) -> int:
    split_dir = SPLITS[split]
    images_dir = ade / "images" / split_dir
    image_files = sorted(images_dir.glob("*.jpg"))
    if not image_files:
        raise FileNotFoundError(f"no images in {images_dir}: unpack ADEChallengeData2016.zip")
    images, annotations = [], []
    for image_id, image_file in enumerate(
        tqdm(image_files, desc=f"ADE20K instances {split}"), start=1
    ):
        instance_file = ade / "annotations_instance" / split_dir / f"{image_file.stem}.png"
        if not instance_file.exists():
            raise FileNotFoundError(f"{instance_file} is missing (annotations_instance download)")
        instance_png = np.asarray(Image.open(instance_file).convert("RGB"))
        height, width = instance_png.shape[:2]
        images.append(
            {"id": image_id, "file_name": image_file.name, "height": height, "width": width}
        )
        for mask, category_id in iter_ade20k_instances(instance_png, category_mapping):
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": rle,
                    "area": int(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": ADE20K_150_CLASSES[i]} for i in ADE20K_150_THING_IDS]
    with open(ade / f"ade20k_instance_{split}.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return len(images)


def main() -> None:
    parser = prepare_parser(__doc__)
    parser.add_argument("--catid-mapping", type=Path, help="ade20k_instance_catid_mapping.txt")
    args = parser.parse_args()
    ade = args.root / "ADEChallengeData2016"
    mapping = read_instance_category_mapping(
        args.catid_mapping or ade / "ade20k_instance_catid_mapping.txt"
    )
    for split in SPLITS:
        print(f"ADE20K instances {split}: {convert_split(ade, split, mapping)} images")


if __name__ == "__main__":
    main()
