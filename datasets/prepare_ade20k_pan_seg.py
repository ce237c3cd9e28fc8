"""ADE20K-150 panoptic annotations in COCO-panoptic format (the Mask2Former benchmark).

Reads  $OPENSEG_DATASETS/ADEChallengeData2016/{images,annotations,annotations_instance}/<split>/
       and ade20k_instance_catid_mapping.txt (from github.com/CSAILVision/ADE20K, utils/)
Writes $OPENSEG_DATASETS/ADEChallengeData2016/ade20k_panoptic_{train,val}{.json,/*.png}

Stuff segments come from the semantic labels of the 50 stuff classes; thing segments from the
instance annotations, pasted over them (the two sources overlap slightly). Category ids are the
ADE-150 contiguous ids (0..149); segment ids are 1..N per image.
"""

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from panopticapi.utils import id2rgb
from PIL import Image
from tqdm import tqdm

from openseg.data.datasets.ade20k import (
    ADE20K_150_CLASSES,
    ADE20K_150_THING_IDS,
    iter_ade20k_instances,
    read_instance_category_mapping,
)
from openseg.data.datasets.common import panoptic_segment, prepare_parser

SPLITS = {"train": "training", "val": "validation"}


def panoptic_from_ade(
    semantic: np.ndarray, instance_png: np.ndarray, category_mapping: Dict[int, int]
) -> Tuple[np.ndarray, List[Dict]]:
    """Segment-id map and segments_info from an official semantic PNG (0 = other, k = class
    k - 1) and an annotations_instance PNG."""
    thing_ids = set(ADE20K_150_THING_IDS)
    segment_map = np.zeros(semantic.shape, dtype=np.int64)
    masks: List[Tuple[np.ndarray, int]] = []
    for label in np.unique(semantic):
        if label != 0 and int(label) - 1 not in thing_ids:
            masks.append((semantic == label, int(label) - 1))
    masks.extend(iter_ade20k_instances(instance_png, category_mapping))
    for segment_id, (mask, _) in enumerate(masks, start=1):
        segment_map[mask] = segment_id
    segments_info = []
    for segment_id, (_, category_id) in enumerate(masks, start=1):
        visible = segment_map == segment_id
        if visible.any():  # a stuff region can be covered entirely by instances
            segments_info.append(panoptic_segment(visible, segment_id, category_id))
    return segment_map, segments_info


def convert_split(ade: Path, split: str, category_mapping: Dict[int, int]) -> int:
    split_dir = SPLITS[split]
    images_dir = ade / "images" / split_dir
    image_files = sorted(images_dir.glob("*.jpg"))
    if not image_files:
        raise FileNotFoundError(f"no images in {images_dir}: unpack ADEChallengeData2016.zip")
    out_dir = ade / f"ade20k_panoptic_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_file in tqdm(image_files, desc=f"ADE20K panoptic {split}"):
        stem = image_file.stem
        semantic_file = ade / "annotations" / split_dir / f"{stem}.png"
        instance_file = ade / "annotations_instance" / split_dir / f"{stem}.png"
        for path in (semantic_file, instance_file):
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} is missing (annotations / annotations_instance downloads)"
                )
        semantic = np.asarray(Image.open(semantic_file))
        segment_map, segments_info = panoptic_from_ade(
            semantic, np.asarray(Image.open(instance_file).convert("RGB")), category_mapping
        )
        Image.fromarray(id2rgb(segment_map)).save(out_dir / f"{stem}.png")
        height, width = semantic.shape
        images.append({"id": stem, "file_name": image_file.name, "height": height, "width": width})
        annotations.append(
            {"image_id": stem, "file_name": f"{stem}.png", "segments_info": segments_info}
        )
    thing_ids = set(ADE20K_150_THING_IDS)
    categories = [
        {"id": i, "name": name, "isthing": int(i in thing_ids)}
        for i, name in enumerate(ADE20K_150_CLASSES)
    ]
    with open(ade / f"ade20k_panoptic_{split}.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return len(images)


def main() -> None:
    parser = prepare_parser(__doc__)
    parser.add_argument(
        "--catid-mapping",
        type=Path,
        help="ade20k_instance_catid_mapping.txt (default: <root>/ADEChallengeData2016/...)",
    )
    args = parser.parse_args()
    ade = args.root / "ADEChallengeData2016"
    mapping = read_instance_category_mapping(
        args.catid_mapping or ade / "ade20k_instance_catid_mapping.txt"
    )
    for split in SPLITS:
        print(f"ADE20K panoptic {split}: {convert_split(ade, split, mapping)} images")


if __name__ == "__main__":
    main()
