"""FC-CLIP (Yu et al. NeurIPS 2023): open-vocabulary panoptic segmentation with a single
frozen convolutional CLIP.

Importing registers the `FCCLIP` meta-architecture and the tiny random-init open_clip model
configs of `open_clip_configs/` (used by configs/demo/fcclip_*.yaml and the tests).
"""
import os

import open_clip

from .config import add_fcclip_config
from . import checkpoint  # registers the released checkpoints' layout
from .meta_arch import FCCLIP, InVocabularyClassifier, geometric_ensemble

# area-weighted pooling under its former name here, for tools/oracle_study.py; new code
# imports openseg.modeling.mask_pooling (weighted_mask_pool, or mask_pool for FC-CLIP's
# binarised-logit pooling)
from openseg.modeling.mask_pooling import weighted_mask_pool as mask_pool

OPEN_CLIP_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "open_clip_configs")
open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)

__all__ = [
    "FCCLIP",
    "InVocabularyClassifier",
    "OPEN_CLIP_CONFIG_DIR",
    "add_fcclip_config",
    "geometric_ensemble",
    "mask_pool",
]
