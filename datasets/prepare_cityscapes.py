"""Convert Cityscapes gtFine to COCO-panoptic format and trainId label maps.

Reads  $OPENSEG_DATASETS/cityscapes/gtFine/<split>/<city>/*_gtFine_{instanceIds,labelIds}.png
Writes $OPENSEG_DATASETS/cityscapes/gtFine/cityscapes_panoptic_<split>/<id>_gtFine_panoptic.png,
       $OPENSEG_DATASETS/cityscapes/gtFine/cityscapes_panoptic_<split>.json and
       <id>_gtFine_labelTrainIds.png next to each labelIds file.

The panoptic encoding follows the Cityscapes panoptic benchmark (Kirillov et al., CVPR 2019):
an `instanceIds` pixel value v >= 1000 is instance v % 1000 of label v // 1000; v < 1000 is the
label itself, which for a thing class marks a crowd region (iscrowd = 1). The segment id is v;
category ids are Cityscapes labelIds; classes ignored in evaluation are dropped (id 0 = void).
"""

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from panopticapi.utils import id2rgb
from PIL import Image
from tqdm import tqdm

from openseg.data.datasets.cityscapes import CITYSCAPES_19, CITYSCAPES_LABEL_DIVISOR
from openseg.data.datasets.common import panoptic_segment, prepare_parser, remap_labels

_CLASS_BY_LABEL_ID = {c.label_id: c for c in CITYSCAPES_19}
TRAIN_ID_OF_LABEL_ID = {c.label_id: train_id for train_id, c in enumerate(CITYSCAPES_19)}


def panoptic_from_instance_ids(instance_ids: np.ndarray) -> Tuple[np.ndarray, List[Dict]]:
    """Segment-id map (0 = void) and COCO-panoptic `segments_info` of one instanceIds image."""
    segment_map = np.zeros(instance_ids.shape, dtype=np.int64)
    segments_info = []
    for value in np.unique(instance_ids):
        value = int(value)
        label_id = value // CITYSCAPES_LABEL_DIVISOR if value >= CITYSCAPES_LABEL_DIVISOR else value
        cls = _CLASS_BY_LABEL_ID.get(label_id)
        if cls is None:  # void or ignored in evaluation
            continue
        mask = instance_ids == value
        segment_map[mask] = value
        iscrowd = cls.is_thing and value < CITYSCAPES_LABEL_DIVISOR
        segments_info.append(panoptic_segment(mask, value, label_id, iscrowd))
    return segment_map, segments_info


def convert_split(cityscapes: Path, split: str) -> int:
    """Write the panoptic PNGs + JSON and labelTrainIds PNGs of `split`; return #images."""
    gt_dir = cityscapes / "gtFine" / split
    if not gt_dir.is_dir():
        raise FileNotFoundError(
            f"{gt_dir} not found: unpack gtFine_trainvaltest.zip into {cityscapes}"
        )
    instance_files = sorted(gt_dir.glob("*/*_gtFine_instanceIds.png"))
    if not instance_files:
        raise FileNotFoundError(f"no *_gtFine_instanceIds.png under {gt_dir}")
    out_dir = cityscapes / "gtFine" / f"cityscapes_panoptic_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for instance_file in tqdm(instance_files, desc=f"cityscapes {split}"):
        image_id = instance_file.name[: -len("_gtFine_instanceIds.png")]
        label_file = instance_file.with_name(f"{image_id}_gtFine_labelIds.png")
        if not label_file.exists():
            raise FileNotFoundError(
                f"{label_file} is missing (it comes with gtFine_trainvaltest.zip)"
            )
        instance_ids = np.asarray(Image.open(instance_file), dtype=np.int64)
        segment_map, segments_info = panoptic_from_instance_ids(instance_ids)
        pan_name = f"{image_id}_gtFine_panoptic.png"
        Image.fromarray(id2rgb(segment_map)).save(out_dir / pan_name)
        train_ids = remap_labels(np.asarray(Image.open(label_file)), TRAIN_ID_OF_LABEL_ID, 255)
        Image.fromarray(train_ids.astype(np.uint8)).save(
            instance_file.with_name(f"{image_id}_gtFine_labelTrainIds.png")
        )
        height, width = instance_ids.shape
        images.append(
            {
                "id": image_id,
                "file_name": f"{image_id}_leftImg8bit.png",
                "height": height,
                "width": width,
            }
        )
        annotations.append(
            {"image_id": image_id, "file_name": pan_name, "segments_info": segments_info}
        )
    categories = [
        {
            "id": c.label_id,
            "name": c.name,
            "isthing": int(c.is_thing),
            "supercategory": "cityscapes",
        }
        for c in CITYSCAPES_19
    ]
    with open(cityscapes / "gtFine" / f"cityscapes_panoptic_{split}.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return len(images)


def main() -> None:
    parser = prepare_parser(__doc__)
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    args = parser.parse_args()
    for split in args.splits:
        count = convert_split(args.root / "cityscapes", split)
        print(f"cityscapes {split}: {count} images converted")


if __name__ == "__main__":
    main()
