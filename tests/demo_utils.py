"""Demo datasets registered with their files under a temporary root, for tests that generate
them (the default registration under `dataset_root()` is restored afterwards)."""

import contextlib
from pathlib import Path
from typing import Iterator, List, Tuple

from detectron2.data import DatasetCatalog

from openseg.data.datasets.common import dataset_root
from openseg.data.datasets.demo import register_all_demo


@contextlib.contextmanager
def demo_registered_at(root: Path, prefix: str) -> Iterator[Tuple[List[dict], List[dict]]]:
    """Register every demo dataset with files under `root`; yields the dataset dicts of
    `<prefix>_train` and `<prefix>_val` (generated on this first load)."""
    register_all_demo(root)
    try:
        yield DatasetCatalog.get(f"{prefix}_train"), DatasetCatalog.get(f"{prefix}_val")
    finally:
        register_all_demo(dataset_root())
