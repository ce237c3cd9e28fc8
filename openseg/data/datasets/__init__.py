"""Dataset registry: importing this package registers every family under `dataset_root()`.

Registration only records loaders and metadata; files are read (and missing ones reported
with the prepare script to run) when `DatasetCatalog.get(name)` is called.
"""

import os
from pathlib import Path
from typing import Optional

from .ade20k import register_all_ade20k
from .cityscapes import register_all_cityscapes
from .coco import register_all_coco
from .common import DatasetNotFoundError, dataset_root, register_lazy, require
from .demo import generate_demo, register_all_demo
from .lvis import register_all_lvis
from .lvis_ow import register_all_lvis_ow
from .pascal_context import register_all_pascal_context
from .pascal_voc import register_all_pascal_voc
from .refcoco import register_all_refcoco
from .scannet import register_all_scannet
from .sun_rgbd import register_all_sun_rgbd

REGISTER_FUNCTIONS = (
    register_all_demo,
    register_all_coco,
    register_all_ade20k,
    register_all_lvis,
    register_all_lvis_ow,
    register_all_cityscapes,
    register_all_pascal_voc,
    register_all_pascal_context,
    register_all_sun_rgbd,
    register_all_scannet,
    register_all_refcoco,
)


def register_all(root: Optional[os.PathLike] = None) -> None:
    """(Re-)register every dataset family under `root` (default: `dataset_root()`), e.g. after
    changing $OPENSEG_DATASETS."""
    root = dataset_root() if root is None else Path(root)
    for register in REGISTER_FUNCTIONS:
        register(root)


register_all()

__all__ = [
    "DatasetNotFoundError",
    "dataset_root",
    "generate_demo",
    "register_all",
    "register_lazy",
    "require",
]
