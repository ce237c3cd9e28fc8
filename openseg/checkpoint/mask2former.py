"""Parameter names of the released Mask2Former <-> openseg's `OpenSegMaskFormer`.

The release (Cheng et al., CVPR 2022; facebookresearch/Mask2Former) wraps its pixel decoder and
transformer decoder in a `MaskFormerHead` (`sem_seg_head`); openseg holds them directly on the
meta-architecture. Both use detectron2's backbones under `backbone.` and keep the set
criterion's no-object weight as the buffer `criterion.empty_weight`, so those names are
identical. The renames, applied to the whole state dict of the release's `MaskFormer`
meta-architecture (what its `.pth` files and model-zoo `.pkl` files hold), are:

==========================================================  ===============================================
release                                                     openseg
==========================================================  ===============================================
``sem_seg_head.pixel_decoder.transformer.encoder.layers.i``  ``pixel_decoder.transformer.layers.i``
``sem_seg_head.pixel_decoder.adapter_j``                     ``pixel_decoder.lateral_convs.(j-1)``
``sem_seg_head.pixel_decoder.layer_j``                       ``pixel_decoder.output_convs.(j-1)``
``sem_seg_head.pixel_decoder.*``                             ``pixel_decoder.*``
``sem_seg_head.predictor.class_embed.*``                     ``transformer_decoder.class_predictor.*``
``sem_seg_head.predictor.*``                                 ``transformer_decoder.*``
``backbone.*``, ``criterion.empty_weight``                   unchanged
==========================================================  ===============================================

(`adapter_j` / `layer_j` are the release's FPN lateral / output convolutions numbered from the
finest input, j = 1, 2, ...; openseg's `lateral_convs` / `output_convs` list them in the same
order.) Tensors are passed through unchanged: every module has the same parameter shapes.
"""
import re
from typing import Dict, Iterable, List, Mapping, Tuple

from torch import Tensor

__all__ = ["UnmappedKeysError", "reference_to_openseg", "openseg_to_reference"]

# (release prefix, openseg prefix): the first rule whose prefix starts a key renames it;
# "{}" stands for a module index (the release's adapter_j / layer_j count from 1, openseg's
# ModuleLists from 0)
_RULES: List[Tuple[str, str]] = [
    ("sem_seg_head.pixel_decoder.transformer.encoder.layers.", "pixel_decoder.transformer.layers."),
    ("sem_seg_head.pixel_decoder.adapter_{}.", "pixel_decoder.lateral_convs.{}."),
    ("sem_seg_head.pixel_decoder.layer_{}.", "pixel_decoder.output_convs.{}."),
    ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
    ("sem_seg_head.predictor.class_embed.", "transformer_decoder.class_predictor."),
    ("sem_seg_head.predictor.", "transformer_decoder."),
    ("backbone.", "backbone."),
    ("criterion.empty_weight", "criterion.empty_weight"),
]


class UnmappedKeysError(KeyError):
    """Keys of a state dict that no Mask2Former naming rule covers (`unmapped` lists them all)."""

    def __init__(self, direction: str, keys: Iterable[str]):
        self.unmapped = sorted(keys)
        shown = ", ".join(self.unmapped[:20]) + (" ..." if len(self.unmapped) > 20 else "")
        super().__init__(
            f"{direction}: {len(self.unmapped)} parameter name(s) have no Mask2Former mapping: {shown}. "
            "The state dict does not come from Mask2Former's `MaskFormer` meta-architecture "
            "(or openseg's `OpenSegMaskFormer`); a method adding modules must map its own keys "
            "before calling openseg.checkpoint.mask2former."
        )

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def _prefix_regex(prefix: str) -> "re.Pattern":
    return re.compile("^" + re.escape(prefix).replace(re.escape("{}"), r"(\d+)") + "(.*)$", re.S)


_Rule = Tuple["re.Pattern", str, int]
_FORWARD: List[_Rule] = [(_prefix_regex(ref), ours, -1) for ref, ours in _RULES]
_BACKWARD: List[_Rule] = [(_prefix_regex(ours), ref, +1) for ref, ours in _RULES]


def _rename(state_dict: Mapping[str, Tensor], rules: List[_Rule], direction: str) -> Dict[str, Tensor]:
    renamed: Dict[str, Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        for regex, template, index_shift in rules:
            match = regex.match(key)
            if match is None:
                continue
            *index, rest = match.groups()
            new_key = template.format(*(int(i) + index_shift for i in index)) + rest
            if new_key in renamed:
                raise ValueError(f"{direction}: two keys map to {new_key!r} (the second is {key!r})")
            renamed[new_key] = value
            break
        else:
            unmapped.append(key)
    if unmapped:
        raise UnmappedKeysError(direction, unmapped)
    return renamed


def reference_to_openseg(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Rename a released Mask2Former state dict (`MaskFormer` meta-arch) to openseg's names.

    Raises `UnmappedKeysError` listing every key no rule covers; values are not copied.
    """
    return _rename(state_dict, _FORWARD, "reference_to_openseg")


def openseg_to_reference(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Inverse of `reference_to_openseg`: openseg's `OpenSegMaskFormer` names to the release's."""
    return _rename(state_dict, _BACKWARD, "openseg_to_reference")
