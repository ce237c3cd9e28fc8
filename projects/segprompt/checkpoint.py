"""Checkpoints of the SegPrompt release (aim-uofa/SegPrompt, `SegPrompt` meta-architecture)
read into `SegPromptMaskFormer`.

The release is Mask2Former's layout (`openseg.checkpoint.mask2former`) plus, in the
transformer decoder (`sem_seg_head.predictor.`), the prompt-branch tables indexed by LVIS
category id - 1 with one padding row (1204 rows), and two more criteria:

=====================================================  ==========================================
release                                                openseg
=====================================================  ==========================================
``sem_seg_head.predictor.memory_bank.weight`` [1204]   ``prompt_cache.prompts`` (padding row dropped)
``sem_seg_head.predictor.id2feat.weight`` [1204]       ``query_builder.class_content.weight`` (same)
``sem_seg_head.predictor.id2pe.weight`` [1204]         ``query_builder.class_pos.weight`` (same)
``sem_seg_head.predictor.ex2feat.*`` / ``ex2pe.*``     ``query_builder.prompt_to_content/pos.*``
``sem_seg_head.predictor.query_repeat_feat/pos.*``     ``query_builder.rank_content/pos.*``
``sem_seg_head.predictor.class_embed`` [81 rows]       ``transformer_decoder.class_predictor``: rows
                                                       0 ("object") and 80 ("no object")
``criterion2.*``, ``criterion3.*``                     dropped (config-derived loss weights)
=====================================================  ==========================================

The release trains every class head "binary" (`BINARY_CLASSIFICATION`: target 0 = object) in
an 81-way head (SEM_SEG_HEAD.NUM_CLASSES 80) whose other 79 logits are only ever pushed
down; openseg's class-agnostic head keeps the two trained rows, so scores are the softmax
over {object, no object} instead of over all 81 logits. Rows of the class tables are
contiguous class ids, which for LVIS (categories sorted by id) are LVIS id - 1.
"""

from typing import Dict

from torch import Tensor

from openseg.checkpoint import CheckpointFormat, register_checkpoint_format
from openseg.checkpoint.mask2former import reference_to_openseg

PREDICTOR = "sem_seg_head.predictor."
# release decoder name -> openseg name, and whether the release's padding row (the last of
# its id-indexed tables) is dropped
PROMPT_KEYS = {
    "memory_bank.weight": ("prompt_cache.prompts", True),
    "id2feat.weight": ("query_builder.class_content.weight", True),
    "id2pe.weight": ("query_builder.class_pos.weight", True),
    "ex2feat.weight": ("query_builder.prompt_to_content.weight", False),
    "ex2feat.bias": ("query_builder.prompt_to_content.bias", False),
    "ex2pe.weight": ("query_builder.prompt_to_pos.weight", False),
    "ex2pe.bias": ("query_builder.prompt_to_pos.bias", False),
    "query_repeat_feat.weight": ("query_builder.rank_content.weight", False),
    "query_repeat_pos.weight": ("query_builder.rank_pos.weight", False),
}


def release_to_openseg(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Rename a state dict of the release's `SegPrompt` model (see the module docstring)."""
    state = {k: v for k, v in state.items() if not k.startswith(("criterion2.", "criterion3."))}
    prompt_state = {}
    for name, (ours, drop_padding) in PROMPT_KEYS.items():
        value = state.pop(PREDICTOR + name, None)
        if value is not None:
            prompt_state[ours] = value[:-1] if drop_padding else value
    for suffix in ("weight", "bias"):
        key = PREDICTOR + "class_embed." + suffix
        if key in state and state[key].shape[0] > 2:
            state[key] = state[key][[0, -1]]
    converted = reference_to_openseg(state)
    converted.update(prompt_state)
    return converted


register_checkpoint_format(
    CheckpointFormat(
        name="segprompt",
        detect=lambda keys: any(k.startswith(PREDICTOR + "memory_bank.") for k in keys),
        to_openseg=release_to_openseg,
        priority=10,
    )
)
