"""OpenWorldSAM (Xiao et al. 2025): SAM2 segmenting from language prompts through a small
trainable adapter on a frozen BEiT-3; see README.md."""
from .beit3 import BEiT3EarlyFusionEncoder, BEiT3Tokenizer
from .checkpoint import convert_released_state_dict, released_to_openseg_name
from .config import add_openworldsam_config
from .meta_arch import (
    OpenWorldSAM,
    batch_sigmoid_focal_cost,
    classwise_mask_nms,
    prompt_logits,
    semantic_logits,
    threshold_nms_instances,
)
from .modeling import FrozenSAM2, LanguagePromptAdapter, SoftPromptLayer, sparse_prompt_tokens
from .vl_encoder import (
    VL_ENCODER_REGISTRY,
    OpenCLIPLateFusionEncoder,
    VisionLanguageEncoder,
    build_vl_encoder,
)

__all__ = [
    "add_openworldsam_config",
    "BEiT3EarlyFusionEncoder",
    "BEiT3Tokenizer",
    "convert_released_state_dict",
    "released_to_openseg_name",
    "OpenWorldSAM",
    "batch_sigmoid_focal_cost",
    "classwise_mask_nms",
    "prompt_logits",
    "semantic_logits",
    "threshold_nms_instances",
    "FrozenSAM2",
    "LanguagePromptAdapter",
    "SoftPromptLayer",
    "sparse_prompt_tokens",
    "VL_ENCODER_REGISTRY",
    "OpenCLIPLateFusionEncoder",
    "VisionLanguageEncoder",
    "build_vl_encoder",
]
