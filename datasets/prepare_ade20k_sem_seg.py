"""ADE20K-150 semantic labels in detectron2's convention.

Reads  $OPENSEG_DATASETS/ADEChallengeData2016/annotations/{training,validation}/*.png
Writes $OPENSEG_DATASETS/ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png
with label k (1..150) -> k - 1 and 0 ("other") -> 255, the ignore label.
"""

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from openseg.data.datasets.common import prepare_parser


def convert_label(labels: np.ndarray) -> np.ndarray:
    """Shift official labels to contiguous ids; unlabeled pixels become 255."""
    labels = labels.astype(np.int64)
    return np.where(labels == 0, 255, labels - 1).astype(np.uint8)


def convert(ade: Path, split_dirs: Sequence[str] = ("training", "validation")) -> None:
    for split_dir in split_dirs:
        source = ade / "annotations" / split_dir
        files = sorted(source.glob("*.png"))
        if not files:
            raise FileNotFoundError(
                f"no label PNGs in {source}: unpack ADEChallengeData2016.zip there"
            )
        target = ade / "annotations_detectron2" / split_dir
        target.mkdir(parents=True, exist_ok=True)
        for path in tqdm(files, desc=f"ADE20K {split_dir}"):
            Image.fromarray(convert_label(np.asarray(Image.open(path)))).save(target / path.name)


def main() -> None:
    parser = prepare_parser(__doc__)
    parser.add_argument("--splits", nargs="+", default=["training", "validation"])
    args = parser.parse_args()
    convert(args.root / "ADEChallengeData2016", args.splits)


if __name__ == "__main__":
    main()
