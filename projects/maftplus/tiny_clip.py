"""A tiny random ConvNeXt CLIP for the demo config and the tests (never a real model).

`openseg_convnext_pico` is a timm ConvNeXt with one block per stage and widths 16-128, and
`openseg-maftplus-pico-convnext_base` the open_clip config around it (32-d joint space,
8-wide one-layer text tower). MAFT+ keeps two copies of its CLIP (fine-tuned and frozen), so
the model must be small for the reference fixtures to stay a few MB. The config name holds
"convnext_" and "_base" because the release's CLIP backbone picks its code path from the
name. This module imports nothing from openseg, so the reference-fixture script can load it
by path next to the release.
"""
import os

import open_clip
from timm.models import register_model
from timm.models.convnext import _create_convnext

OPEN_CLIP_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "open_clip_configs")
TINY_CLIP_MODEL_NAME = "openseg-maftplus-pico-convnext_base"


@register_model
def openseg_convnext_pico(pretrained: bool = False, **kwargs):
    """ConvNeXt of depths (1, 1, 1, 1) and widths (16, 32, 64, 128); strides 4-32 as ConvNeXt."""
    return _create_convnext(
        "openseg_convnext_pico", pretrained=pretrained, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), **kwargs
    )


open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)
