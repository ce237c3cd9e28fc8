"""Released OpenWorldSAM checkpoints (Xiao et al. 2025) in openseg's OpenWorldSAM.

The release saves detectron2 checkpoints of its `OpenWorldSAM2` (`{"model": state_dict}`,
e.g. `model_final.pth` for COCO pre-training and `model_final_refcocog.pth`): the adapter
as `text_hidden_fcs.0.{0,2}.*` (projector), `positional_tokens` (tie-breakers) and
`cross_attention_transformer.layers.{i}.{self_attn_norm, self_attn, cross_attn_norm,
cross_attn, mlp_norm, mlp.0, mlp.3}.*`; SAM2 as `visual_model.*`; BEiT-3 as
`mm_extractor.beit3.*`; and the same frozen modules a second time under `evf_sam2.*`
(the EVF-SAM2 container), which are dropped here. `convert_released_state_dict` is a
load_state_dict pre-hook of the meta-architecture, so `MODEL.WEIGHTS <released .pth>` works
through detectron2's checkpointer unchanged.
"""
import re
from typing import Dict, List

RELEASED_RENAMES = (
    (r"^text_hidden_fcs\.0\.", "adapter.projector."),
    (r"^positional_tokens$", "adapter.tie_breakers"),
    (r"^cross_attention_transformer\.layers\.(\d+)\.self_attn_norm\.", r"adapter.layers.\1.norm_self."),
    (r"^cross_attention_transformer\.layers\.(\d+)\.cross_attn_norm\.", r"adapter.layers.\1.norm_cross."),
    (r"^cross_attention_transformer\.layers\.(\d+)\.mlp_norm\.", r"adapter.layers.\1.norm_ffn."),
    (r"^cross_attention_transformer\.layers\.(\d+)\.mlp\.", r"adapter.layers.\1.ffn."),
    (r"^cross_attention_transformer\.layers\.", "adapter.layers."),
    (r"^visual_model\.image_encoder\.", "sam2.image_encoder."),
    (r"^visual_model\.sam_prompt_encoder\.", "sam2.prompt_encoder."),
    (r"^visual_model\.sam_mask_decoder\.", "sam2.mask_decoder."),
    (r"^visual_model\.no_mem_embed$", "sam2.no_mem_embed"),
    (r"^mm_extractor\.beit3\.", "vl_encoder.beit3."),
)
RELEASED_MARKERS = ("text_hidden_fcs.", "positional_tokens", "cross_attention_transformer.")


def is_released_state_dict(state_dict: Dict) -> bool:
    return any(k.startswith(RELEASED_MARKERS) for k in state_dict)


def released_to_openseg_name(name: str) -> str:
    """openseg name of a released parameter, "" if it has no counterpart (EVF-SAM2 duplicates,
    SAM2's video-memory modules)."""
    for pattern, replacement in RELEASED_RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return ""


def convert_released_state_dict(
    state_dict: Dict, prefix: str, local_metadata, strict, missing_keys: List[str],
    unexpected_keys: List[str], error_msgs: List[str],
) -> None:
    """load_state_dict pre-hook: rename a released checkpoint's keys in place (no-op for
    openseg checkpoints)."""
    if not is_released_state_dict({k[len(prefix):]: None for k in state_dict}):
        return
    for key in list(state_dict):
        new_name = released_to_openseg_name(key[len(prefix):])
        value = state_dict.pop(key)
        if new_name:
            state_dict[prefix + new_name] = value
