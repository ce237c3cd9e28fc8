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

The release also reads the older (version 1) layout in which the pixel-decoder parameters sit
directly under ``sem_seg_head.`` and the query features are called ``static_query``: its
`MaskFormerHead` / decoder `_load_from_state_dict` rename them whenever the state dict carries
no version, which is the case for every checkpoint read from a `.pkl` file. `reference_to_openseg`
accepts both layouts the same way. `openseg_to_reference` writes the current layout and marks it
as version 2 (`_metadata`, kept by `torch.save`), so the release loads it without renaming.
"""
import re
from collections import OrderedDict
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


# modules of the release whose `_version` 2 changed parameter names
_VERSIONED_MODULES = ("sem_seg_head", "sem_seg_head.predictor")
_HEAD = "sem_seg_head."
_HEAD_CHILDREN = (_HEAD + "pixel_decoder.", _HEAD + "predictor.")


def _current_layout(key: str) -> str:
    """A release key in its version-2 form (the renaming of the release's loaders)."""
    if key.startswith(_HEAD) and not key.startswith(_HEAD_CHILDREN):
        key = _HEAD + "pixel_decoder." + key[len(_HEAD):]
    if key.startswith(_HEAD + "predictor.static_query"):
        key = key.replace("static_query", "query_feat", 1)
    return key


def reference_to_openseg(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Rename a released Mask2Former state dict (`MaskFormer` meta-arch) to openseg's names.

    Both the current and the version-1 layout of the release are read (see the module
    docstring); a checkpoint without any ``sem_seg_head.pixel_decoder.`` key is version 1. Raises `UnmappedKeysError` listing every key no rule covers; values are not
    copied.
    """
    # the layout is a property of the whole checkpoint: version 1 has no pixel_decoder level
    version_1 = not any(key.startswith(_HEAD_CHILDREN[0]) for key in state_dict)
    current = OrderedDict()
    for key, value in state_dict.items():
        new_key = _current_layout(key) if version_1 else key
        if new_key in current:
            raise ValueError(f"reference_to_openseg: {key!r} and {new_key!r} are the same parameter")
        current[new_key] = value
    return _rename(current, _FORWARD, "reference_to_openseg")


def openseg_to_reference(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Inverse of `reference_to_openseg`: openseg's `OpenSegMaskFormer` names to the release's
    current layout, marked as version 2 so that the release's loaders keep the names."""
    renamed = OrderedDict(_rename(state_dict, _BACKWARD, "openseg_to_reference"))
    renamed._metadata = OrderedDict((name, {"version": 2}) for name in _VERSIONED_MODULES)
    return renamed
