"""Released MAFT+ checkpoints (jiaosiyu1999/MAFT-Plus: maftp_b.pth, maftp_l.pth,
maftp_l_pano.pth) in openseg's `MAFTPlus`.

The release saves its `MAFT_Plus` meta-architecture, which is FC-CLIP's plus two modules:
everything FC-CLIP has is renamed as `projects/fcclip/checkpoint.py` renames it (the
fine-tuned CLIP keeps its name ``backbone.clip_model.*``), and

=================================================  ===============================================
release                                            openseg
=================================================  ===============================================
``backbone_t.*`` (the frozen CLIP)                 ``frozen_backbone.*``
``cdt.cross_atten.multihead_attn.*``               ``transfer.attention.*``
``cdt.cross_atten.norm.*``                         ``transfer.norm.*``
``cdt.cross_atten.MLP.*``                          ``transfer.update.*``
=================================================  ===============================================

Registered as the checkpoint format "maftplus" (detected by ``cdt.cross_atten.`` keys), above
"fcclip", whose detection MAFT+ checkpoints also pass.
"""
from typing import Dict, Sequence, Tuple

from torch import Tensor

from openseg.checkpoint import CheckpointFormat, register_checkpoint_format
from openseg.projects.fcclip.checkpoint import FCCLIP_CHECKPOINT_FORMAT

# (release prefix, openseg prefix) of the keys only MAFT+ has
MAFTPLUS_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("backbone_t.", "frozen_backbone."),
    ("cdt.cross_atten.multihead_attn.", "transfer.attention."),
    ("cdt.cross_atten.norm.", "transfer.norm."),
    ("cdt.cross_atten.MLP.", "transfer.update."),
)


def _rename(state: Dict[str, Tensor], forward: bool) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """(MAFT+'s own keys renamed, the other keys as they are)."""
    own, rest = {}, {}
    for key, value in state.items():
        for release, ours in MAFTPLUS_RENAMES:
            source, target = (release, ours) if forward else (ours, release)
            if key.startswith(source):
                own[target + key[len(source):]] = value
                break
        else:
            rest[key] = value
    return own, rest


def released_to_openseg(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A released MAFT+ state dict in `MAFTPlus` names (tensors are not copied)."""
    own, rest = _rename(state, forward=True)
    converted = FCCLIP_CHECKPOINT_FORMAT.to_openseg(rest)
    converted.update(own)
    return converted


def openseg_to_released(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Inverse of `released_to_openseg` (marked as Mask2Former's version-2 layout)."""
    own, rest = _rename(state, forward=False)
    converted = FCCLIP_CHECKPOINT_FORMAT.from_openseg(rest)
    converted.update(own)
    return converted


def is_released_maftplus(keys: Sequence[str]) -> bool:
    return any(k.startswith("cdt.cross_atten.") for k in keys) and "void_embedding.weight" in keys


MAFTPLUS_CHECKPOINT_FORMAT = register_checkpoint_format(CheckpointFormat(
    name="maftplus",
    detect=is_released_maftplus,
    to_openseg=released_to_openseg,
    from_openseg=openseg_to_released,
    priority=20,  # before "fcclip" and "mask2former", whose keys it shares
))
