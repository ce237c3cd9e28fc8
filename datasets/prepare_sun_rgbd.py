"""SUN RGB-D 37-class semantic segmentation, test split used as validation (5050 images).

Reads  RGB images and 37-class label PNGs (0 = unlabeled, k = class k; e.g. the `seglabel`
       maps of SUNRGBD2Dseg.mat exported per image, as RGB-D segmentation codebases ship
       them), matched by file stem: --images (default $OPENSEG_DATASETS/sun_rgbd/test/image)
       and --labels (default $OPENSEG_DATASETS/sun_rgbd/test/label37)
Writes $OPENSEG_DATASETS/sun_rgbd/images_detectron2/val/<stem>.jpg and
       annotations_detectron2/val/<stem>.png (k -> k - 1, 0 -> 255)
"""

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from openseg.data.datasets.common import prepare_parser, remap_labels

SUN37_MAPPING = {k: k - 1 for k in range(1, 38)}


def convert(sun: Path, images: Path, labels: Path) -> int:
    label_files = sorted(labels.glob("*.png"))
    if not label_files:
        raise FileNotFoundError(f"no label PNGs in {labels} (pass --labels)")
    image_files = {
        p.stem: p for p in images.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    }
    out_images = sun / "images_detectron2" / "val"
    out_labels = sun / "annotations_detectron2" / "val"
    out_images.mkdir(parents=True, exist_ok=True)
    out_labels.mkdir(parents=True, exist_ok=True)
    for label_file in tqdm(label_files, desc="SUN RGB-D"):
        image = image_files.get(label_file.stem)
        if image is None:
            raise FileNotFoundError(
                f"no image named {label_file.stem}.* in {images} for {label_file}"
            )
        values = np.asarray(Image.open(label_file), dtype=np.int64)
        if values.max() > 37:
            raise ValueError(
                f"{label_file} has label {values.max()} > 37: not a 37-class label map"
            )
        Image.fromarray(remap_labels(values, SUN37_MAPPING, 255).astype(np.uint8)).save(
            out_labels / label_file.name
        )
        if image.suffix.lower() in (".jpg", ".jpeg"):
            shutil.copyfile(image, out_images / f"{image.stem}.jpg")
        else:
            Image.open(image).convert("RGB").save(out_images / f"{image.stem}.jpg", quality=95)
    return len(label_files)


def main() -> None:
    parser = prepare_parser(__doc__)
    parser.add_argument("--images", type=Path, help="folder of RGB images")
    parser.add_argument("--labels", type=Path, help="folder of 37-class label PNGs")
    args = parser.parse_args()
    sun = args.root / "sun_rgbd"
    count = convert(
        sun, args.images or sun / "test" / "image", args.labels or sun / "test" / "label37"
    )
    print(f"SUN RGB-D 37 val: {count} images")


if __name__ == "__main__":
    main()
