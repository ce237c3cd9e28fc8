"""OpenWorldSAM (Xiao et al. 2025): SAM2 segmenting from language prompts through a small
trainable adapter; see README.md."""
from .config import add_openworldsam_config
from .meta_arch import OpenWorldSAM, prompt_logits, threshold_nms_instances
from .modeling import FrozenSAM2, LanguagePromptAdapter, SoftPromptLayer
from .vl_encoder import (
    VL_ENCODER_REGISTRY,
    OpenCLIPLateFusionEncoder,
    VisionLanguageEncoder,
    build_vl_encoder,
)

__all__ = [
    "add_openworldsam_config",
    "OpenWorldSAM",
    "prompt_logits",
    "threshold_nms_instances",
    "FrozenSAM2",
    "LanguagePromptAdapter",
    "SoftPromptLayer",
    "VL_ENCODER_REGISTRY",
    "OpenCLIPLateFusionEncoder",
    "VisionLanguageEncoder",
    "build_vl_encoder",
]
