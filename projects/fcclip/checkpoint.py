"""Released FC-CLIP checkpoints (bytedance/fc-clip, e.g. `fcclip_cocopan.pth`) in openseg.

The release saves detectron2 checkpoints of its `FCCLIP` meta-architecture. Besides the
Mask2Former names (`sem_seg_head.pixel_decoder.*`, `sem_seg_head.predictor.*`,
`criterion.empty_weight`; renamed by `openseg.checkpoint.mask2former`) and the frozen
open_clip model (`backbone.clip_model.*`, the same name in openseg's `OpenCLIPBackbone`),
it holds the in-vocabulary head, which openseg keeps in one module
(`transformer_decoder.class_predictor`, `InVocabularyClassifier`):

=================================================  ===============================================
release                                            openseg
=================================================  ===============================================
``sem_seg_head.predictor._mask_pooling_proj.*``    ``transformer_decoder.class_predictor.pooling_projection.*``
``sem_seg_head.predictor.class_embed.*``           ``transformer_decoder.class_predictor.projection.*``
``sem_seg_head.predictor.logit_scale``             ``transformer_decoder.class_predictor.logit_scale``
``void_embedding.weight``                          ``transformer_decoder.class_predictor.void_embedding.weight``
=================================================  ===============================================

Registered as the checkpoint format "fcclip" (detected by ``void_embedding.weight`` with
``sem_seg_head.predictor._mask_pooling_proj.``), so `MODEL.WEIGHTS fcclip_cocopan.pth` and
`tools/convert_checkpoint.py` read and write it.
"""
from collections import OrderedDict
from typing import Dict, Sequence

from torch import Tensor

from openseg.checkpoint import CheckpointFormat, register_checkpoint_format
from openseg.checkpoint.mask2former import openseg_to_reference, reference_to_openseg

_HEAD = "transformer_decoder.class_predictor."
# (release prefix, openseg prefix) of the keys only FC-CLIP has
FCCLIP_RENAMES = (
    ("sem_seg_head.predictor._mask_pooling_proj.", _HEAD + "pooling_projection."),
    ("sem_seg_head.predictor.class_embed.", _HEAD + "projection."),
    ("sem_seg_head.predictor.logit_scale", _HEAD + "logit_scale"),
    ("void_embedding.weight", _HEAD + "void_embedding.weight"),
)


def _split(state: Dict[str, Tensor], prefixes: Sequence[str]):
    own = {k: v for k, v in state.items() if k.startswith(tuple(prefixes))}
    return own, OrderedDict((k, v) for k, v in state.items() if k not in own)


def _rename(key: str, forward: bool) -> str:
    for release, ours in FCCLIP_RENAMES:
        source, target = (release, ours) if forward else (ours, release)
        if key.startswith(source):
            return target + key[len(source):]
    raise KeyError(key)


def released_to_openseg(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A released FC-CLIP state dict in openseg's names (tensors are not copied)."""
    own, rest = _split(state, [release for release, _ in FCCLIP_RENAMES])
    converted = dict(reference_to_openseg(rest))
    converted.update({_rename(k, True): v for k, v in own.items()})
    return converted


def openseg_to_released(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Inverse of `released_to_openseg` (marked as Mask2Former's version-2 layout)."""
    own, rest = _split(state, [ours for _, ours in FCCLIP_RENAMES])
    converted = openseg_to_reference(rest)
    converted.update({_rename(k, False): v for k, v in own.items()})
    return converted


def is_released_fcclip(keys: Sequence[str]) -> bool:
    return "void_embedding.weight" in keys and any(
        k.startswith("sem_seg_head.predictor._mask_pooling_proj.") for k in keys
    )


FCCLIP_CHECKPOINT_FORMAT = register_checkpoint_format(CheckpointFormat(
    name="fcclip",
    detect=is_released_fcclip,
    to_openseg=released_to_openseg,
    from_openseg=openseg_to_released,
    priority=10,  # before "mask2former", whose keys it shares
))
