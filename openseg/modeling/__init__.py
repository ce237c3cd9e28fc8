"""Mask2Former-style parts shared by every method; importing fills detectron2's registries."""
from . import backbones  # noqa: F401  (registers build_openclip_backbone)
from .mask_decoder import TRANSFORMER_DECODER_REGISTRY, QueryGroup, build_transformer_decoder
from .meta_arch import OpenSegMaskFormer
from .pixel_decoder import PIXEL_DECODER_REGISTRY, build_pixel_decoder

__all__ = [
    "OpenSegMaskFormer",
    "PIXEL_DECODER_REGISTRY",
    "QueryGroup",
    "TRANSFORMER_DECODER_REGISTRY",
    "build_pixel_decoder",
    "build_transformer_decoder",
]
