"""Pascal VOC 2012 validation labels without background (VOC-20).

Reads  $OPENSEG_DATASETS/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt and
       SegmentationClass/<id>.png (0 = background, 1..20 = classes, 255 = boundary)
Writes $OPENSEG_DATASETS/VOCdevkit/VOC2012/annotations_detectron2/val/<id>.png
       with class k -> k - 1 and background / boundary -> 255 (ignored).
"""

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from openseg.data.datasets.common import prepare_parser, remap_labels

VOC20_MAPPING = {k: k - 1 for k in range(1, 21)}


def convert(voc: Path) -> int:
    split_file = voc / "ImageSets" / "Segmentation" / "val.txt"
    if not split_file.exists():
        raise FileNotFoundError(
            f"{split_file} not found: unpack VOCtrainval_11-May-2012.tar into {voc.parent.parent}"
        )
    target = voc / "annotations_detectron2" / "val"
    target.mkdir(parents=True, exist_ok=True)
    ids = split_file.read_text().split()
    for image_id in tqdm(ids, desc="VOC2012 val"):
        source = voc / "SegmentationClass" / f"{image_id}.png"
        if not source.exists():
            raise FileNotFoundError(f"{source} listed in {split_file} is missing")
        labels = remap_labels(np.asarray(Image.open(source)), VOC20_MAPPING, 255)
        Image.fromarray(labels.astype(np.uint8)).save(target / f"{image_id}.png")
    return len(ids)


def main() -> None:
    parser = prepare_parser(__doc__)
    count = convert(parser.parse_args().root / "VOCdevkit" / "VOC2012")
    print(f"VOC-20 val: {count} label maps")


if __name__ == "__main__":
    main()
