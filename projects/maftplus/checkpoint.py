"""Released MAFT+ checkpoints (jiaosiyu1999/MAFT-Plus: maftp_b.pth, maftp_l.pth,
maftp_l_pano.pth) in openseg's `MAFTPlus`.

The release saves its `MAFT_Plus` meta-architecture: the fine-tuned CLIP as
``backbone.clip_model.*`` and the frozen one as ``backbone_t.clip_model.*`` (open_clip names,
as openseg's CLIP backbones), FC-CLIP's head as ``sem_seg_head.{pixel_decoder,predictor}.*``
(Mask2Former's names, renamed by `openseg.checkpoint.mask2former`, except the in-vocabulary
classifier: ``predictor.class_embed`` / ``predictor.logit_scale`` plus the meta-architecture's
``void_embedding``), and the content-dependent transfer as ``cdt.cross_atten.*``. The
decoder's ``_mask_pooling_proj`` is never used by the release's forward and is dropped.
"""
from typing import Dict, List, Sequence, Tuple

from torch import Tensor

from openseg.checkpoint import CheckpointFormat, register_checkpoint_format
from openseg.checkpoint.mask2former import openseg_to_reference, reference_to_openseg

# (release prefix, openseg prefix) renamed before Mask2Former's renames; "" drops the key
_RENAMES: List[Tuple[str, str]] = [
    ("backbone_t.", "frozen_backbone."),
    ("void_embedding.", "transformer_decoder.class_predictor.void_embedding."),
    ("sem_seg_head.predictor.class_embed.", "transformer_decoder.class_predictor.projection."),
    ("sem_seg_head.predictor.logit_scale", "transformer_decoder.class_predictor.logit_scale"),
    ("sem_seg_head.predictor._mask_pooling_proj.", ""),
    ("cdt.cross_atten.multihead_attn.", "transfer.attention."),
    ("cdt.cross_atten.norm.", "transfer.norm."),
    ("cdt.cross_atten.MLP.", "transfer.update."),
]


def _is_released(keys: Sequence[str]) -> bool:
    return any(k.startswith("cdt.cross_atten.") for k in keys) and any(
        k.startswith("sem_seg_head.predictor.") for k in keys
    )


def _split(state: Dict[str, Tensor], renames: List[Tuple[str, str]]) -> Tuple[Dict, Dict]:
    """(keys renamed by `renames`, the other keys unchanged); a rename to "" drops the key."""
    own, rest = {}, {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                if new:
                    own[new + key[len(old):]] = value
                break
        else:
            rest[key] = value
    return own, rest


def released_to_openseg(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Rename a released MAFT+ state dict into `MAFTPlus` names."""
    own, rest = _split(state, _RENAMES)
    return {**reference_to_openseg(rest), **own}


def openseg_to_released(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Inverse of `released_to_openseg` (without the unused ``_mask_pooling_proj``)."""
    own, rest = _split(state, [(new, old) for old, new in _RENAMES if new])
    released = openseg_to_reference(rest)  # keeps the release's version marks (_metadata)
    released.update(own)
    return released


register_checkpoint_format(CheckpointFormat(
    name="maftplus",
    detect=_is_released,
    to_openseg=released_to_openseg,
    from_openseg=openseg_to_released,
    priority=10,
))
