"""Backbones; importing this package registers them in detectron2's BACKBONE_REGISTRY."""

from .clip import (
    CLIP_DENSE_INPUT,
    OpenCLIPBackbone,
    OpenCLIPConvNeXtBackbone,
    OpenCLIPResNetBackbone,
    OpenCLIPTimmViTBackbone,
    OpenCLIPViTBackbone,
    build_openclip_backbone,
    load_tokenizer,
)
from .swin import D2SwinTransformer

__all__ = [
    "CLIP_DENSE_INPUT",
    "D2SwinTransformer",
    "OpenCLIPBackbone",
    "OpenCLIPConvNeXtBackbone",
    "OpenCLIPResNetBackbone",
    "OpenCLIPTimmViTBackbone",
    "OpenCLIPViTBackbone",
    "build_openclip_backbone",
    "load_tokenizer",
]
