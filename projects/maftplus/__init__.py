"""MAFT+ (Jiao et al. ECCV 2024, "Collaborative Vision-Text Representation Optimizing for
Open-Vocabulary Segmentation"): FC-CLIP with a fine-tuned CLIP image encoder,
content-dependent text transfer, representation compensation and the mask-aware loss.

Importing registers the `MAFTPlus` meta-architecture, the released-checkpoint layout
("maftplus") and the tiny random CLIP of `tiny_clip.py` (demo config and tests).
"""
from . import tiny_clip
from .checkpoint import MAFTPLUS_CHECKPOINT_FORMAT, openseg_to_released, released_to_openseg
from .config import add_maftplus_config
from .meta_arch import MAFTPlus
from .modules import (
    ContentDependentTransfer,
    mask_aware_loss,
    pyramid_pooling,
    representation_compensation_loss,
)

__all__ = [
    "ContentDependentTransfer",
    "MAFTPLUS_CHECKPOINT_FORMAT",
    "MAFTPlus",
    "add_maftplus_config",
    "mask_aware_loss",
    "openseg_to_released",
    "pyramid_pooling",
    "released_to_openseg",
    "representation_compensation_loss",
    "tiny_clip",
]
