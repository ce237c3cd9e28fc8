"""Read released checkpoints of any supported layout into openseg's parameter names, and load
them strictly: everything is checked before a single tensor is copied.

A checkpoint file is read (`read_checkpoint_file`), its layout is recognised by the first
registered `CheckpointFormat` whose `detect` accepts its keys, and `to_openseg` renames its
tensors. Built-in formats: openseg's own checkpoints, detectron2 ResNets (torchvision-converted
``R-50.pkl`` / ``R-101.pkl`` of Mask2Former's model zoo, and MSRA's Caffe2 ones), raw torchvision
ResNet state dicts, and the Swin ImageNet weights Mask2Former's
``tools/convert-pretrained-swin-model-to-d2.py`` writes; any other file is compared with the
model under its own names. Full Mask2Former checkpoints are registered by
`openseg.checkpoint` (renaming with `openseg.checkpoint.mask2former`); methods (FC-CLIP,
SegPrompt, MAFT+) register their own with `register_checkpoint_format`, at a higher
`priority` when their keys also look like Mask2Former's.

Loading (`OpenSegCheckpointer`) is strict where a silent partial load would be wrong:
  * a key of the model that the checkpoint should hold but does not (any key for a full-model
    format, a ``backbone.`` key for an ImageNet backbone) is an error naming the keys;
  * a tensor whose shape differs from the model's is an error naming the keys and shapes;
  * a file that is not a checkpoint (garbage bytes, truncated) is an error naming the file.
`MODEL.WEIGHTS_ALLOW_MISSING` lists key prefixes exempt from the first two rules (they keep
their initialisation), e.g. ``["transformer_decoder.class_predictor"]`` to fine-tune a
released model with a new class head. Keys of the checkpoint that the model does not have
are logged as unused. ``criterion.*`` buffers are derived from the config and never loaded.
"""
import logging
import os
import pickle
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import convert_basic_c2_names
from detectron2.config import CfgNode
from fvcore.common.checkpoint import _IncompatibleKeys
from torch import nn

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
# model keys computed from the config, never taken from a checkpoint
CONFIG_DERIVED_PREFIXES = ("criterion.",)
# buffers some releases save but openseg recomputes (Swin's window indices and masks)
DERIVED_BUFFER_SUFFIXES = ("relative_position_index", "attn_mask", "num_batches_tracked")
SHOWN_KEYS = 8  # offending keys printed in an error message


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the keys."""


@dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint layout.

    Attributes:
        name: short name shown in logs and accepted by `tools/convert_checkpoint.py`.
        detect: takes the checkpoint's keys, True when the layout is this one.
        to_openseg: renames a state dict of this layout into openseg's names (may drop keys).
        from_openseg: the inverse, for `tools/convert_checkpoint.py`; None if not offered.
        scope: "model" when the checkpoint holds a whole model (every model key is expected),
            "backbone" when it holds an ImageNet backbone (only ``backbone.`` keys expected).
        never_holds: regular expressions of openseg keys this layout never has (e.g. the
            per-stage output norms of Swin, absent from ImageNet weights); they keep their
            initialisation without an error.
        priority: formats are tried from the highest priority down.
    """

    name: str
    detect: Callable[[Sequence[str]], bool]
    to_openseg: Callable[[StateDict], StateDict]
    from_openseg: Optional[Callable[[StateDict], StateDict]] = None
    scope: str = "model"
    never_holds: Tuple[str, ...] = ()
    priority: int = 0

    def __post_init__(self) -> None:
        if self.scope not in ("model", "backbone"):
            raise ValueError(f"CheckpointFormat {self.name}: scope must be 'model' or 'backbone'")


CHECKPOINT_FORMATS: Dict[str, CheckpointFormat] = {}


def register_checkpoint_format(checkpoint_format: CheckpointFormat) -> CheckpointFormat:
    """Add a layout to the registry (a method package calls this at import)."""
    if checkpoint_format.name in CHECKPOINT_FORMATS:
        raise KeyError(f"checkpoint format {checkpoint_format.name!r} is already registered")
    CHECKPOINT_FORMATS[checkpoint_format.name] = checkpoint_format
    return checkpoint_format


def detect_format(keys: Sequence[str]) -> CheckpointFormat:
    """The registered format of highest priority that recognises `keys` (openseg's own names
    when no other does)."""
    for checkpoint_format in sorted(CHECKPOINT_FORMATS.values(), key=lambda f: -f.priority):
        if checkpoint_format.detect(keys):
            return checkpoint_format
    raise KeyError(f"no checkpoint format recognises the keys {list(keys)[:SHOWN_KEYS]}")


# ------------------------------------------------------------------------------ reading files
def _not_a_checkpoint(path: str, reason: Any) -> CheckpointError:
    return CheckpointError(
        f"not a PyTorch / detectron2 checkpoint: {path} ({type(reason).__name__}: {reason}). "
        f"The file may be truncated (an interrupted download or copy) or of another kind."
    )


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err).lower().replace(" ", "_"):
            raise
    # training checkpoints may pickle plain Python objects besides tensors (scheduler state)
    return torch.load(path, map_location="cpu", weights_only=False)


def _pickle_load(path: str) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # model-zoo files pickled by Python 2 too


def _read_raw(path: str) -> Any:
    """Unpickle `path` as detectron2 does for `.pkl` (latin1 pickle, else torch), torch else."""
    errors = (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError,
              AttributeError, ImportError, IndexError, KeyError, UnicodeDecodeError, OSError)
    loaders = [_pickle_load, _torch_load] if path.endswith(".pkl") else [_torch_load]
    first_error: Optional[BaseException] = None
    for load in loaders:
        try:
            return load(path)
        except errors as err:
            first_error = first_error or err
    raise _not_a_checkpoint(path, first_error)


def _as_tensor(key: str, value: Any, path: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(value)
    raise CheckpointError(
        f"{path}: entry {key!r} of the weights is a {type(value).__name__}, not an array; "
        f"this is not a state dict."
    )


def read_checkpoint_file(path: str) -> Dict[str, Any]:
    """The checkpoint at `path` as ``{"model": {name: Tensor}, "__author__": ..., ...}``
    (other top-level entries such as ``iteration`` or ``optimizer`` are kept), in the file's
    own parameter names. Raises `CheckpointError` for anything that is not a checkpoint."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (MODEL.WEIGHTS must be a local file)")
    data = _read_raw(path)
    if not isinstance(data, Mapping):
        raise _not_a_checkpoint(path, TypeError(f"top level is a {type(data).__name__}"))
    data = dict(data)
    if "model" in data and isinstance(data["model"], Mapping):
        weights = data.pop("model")
    elif "state_dict" in data and isinstance(data["state_dict"], Mapping):
        weights = data.pop("state_dict")
    elif "blobs" in data:  # Caffe2 / Detectron1 detection models
        weights, data = data.pop("blobs"), {"__author__": "Caffe2"}
    else:
        weights, data = data, {}
    weights = {k: v for k, v in weights.items() if not str(k).endswith("_momentum")}
    if not weights:
        raise _not_a_checkpoint(path, ValueError("it holds no weights"))
    state = {str(k): _as_tensor(str(k), v, path) for k, v in weights.items()}
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    data["model"] = state
    data.setdefault("__author__", "unknown")
    return data


def convert_to_openseg(state: StateDict, source: str = "<state dict>",
                       format_name: Optional[str] = None) -> Tuple[StateDict, CheckpointFormat]:
    """Rename `state` into openseg's names with the format named `format_name` (detected when
    None); keys openseg recomputes (`DERIVED_BUFFER_SUFFIXES`) are dropped from released
    layouts, while openseg's own checkpoints keep them (BN counters resume exactly)."""
    if format_name is None:
        checkpoint_format = detect_format(list(state))
    elif format_name in CHECKPOINT_FORMATS:
        checkpoint_format = CHECKPOINT_FORMATS[format_name]
    else:
        raise KeyError(f"unknown checkpoint format {format_name!r}; known: {sorted(CHECKPOINT_FORMATS)}")
    try:
        converted = checkpoint_format.to_openseg(dict(state))
    except KeyError as err:
        raise CheckpointError(f"{source} (read as {checkpoint_format.name!r}): {err}") from None
    # openseg's own checkpoints keep their BatchNorm counters, so a resumed run is exact
    derived = DERIVED_BUFFER_SUFFIXES if checkpoint_format.name != "openseg" else tuple(
        s for s in DERIVED_BUFFER_SUFFIXES if s != "num_batches_tracked")
    converted = {k: v for k, v in converted.items() if not k.endswith(derived)}
    return converted, checkpoint_format


def convert_from_openseg(state: StateDict, format_name: str) -> StateDict:
    """Rename an openseg state dict into the layout `format_name` (for releasing weights)."""
    checkpoint_format = CHECKPOINT_FORMATS.get(format_name)
    if checkpoint_format is None or checkpoint_format.from_openseg is None:
        offered = sorted(n for n, f in CHECKPOINT_FORMATS.items() if f.from_openseg is not None)
        raise KeyError(f"no conversion from openseg to {format_name!r}; offered: {offered}")
    return checkpoint_format.from_openseg(dict(state))


# ------------------------------------------------------------------------------ checking
@dataclass
class LoadPlan:
    """What loading a converted state dict into a model would do."""

    loaded: List[str]
    unused: List[str]
    missing: List[str]  # expected but absent, and not allowed: an error
    kept_initialisation: List[str]  # absent, but not expected or allowed
    shape_mismatch: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]  # not allowed: an error
    skipped_shapes: List[str]  # allowed shape mismatches, left at initialisation


def _starts_with_any(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(prefix) for prefix in prefixes)


def plan_load(model_state: Mapping[str, torch.Tensor], state: StateDict,
              checkpoint_format: CheckpointFormat, allow_missing: Sequence[str] = ()) -> LoadPlan:
    """Compare a converted checkpoint with the model's state dict, without loading anything."""
    never = [re.compile(p) for p in checkpoint_format.never_holds]
    plan = LoadPlan([], [], [], [], [], [])
    for key, target in model_state.items():
        if key.startswith(CONFIG_DERIVED_PREFIXES):
            continue
        if key.endswith(DERIVED_BUFFER_SUFFIXES) and key not in state:
            continue
        allowed = _starts_with_any(key, allow_missing)
        if key in state:
            if tuple(state[key].shape) == tuple(target.shape):
                plan.loaded.append(key)
            elif allowed:
                plan.skipped_shapes.append(key)
            else:
                plan.shape_mismatch.append((key, tuple(state[key].shape), tuple(target.shape)))
            continue
        expected = checkpoint_format.scope == "model" or key.startswith("backbone.")
        if expected and not allowed and not any(p.search(key) for p in never):
            plan.missing.append(key)
        else:
            plan.kept_initialisation.append(key)
    plan.unused = [k for k in state if k not in model_state
                   and not k.startswith(CONFIG_DERIVED_PREFIXES)]
    return plan


def _group(keys: Sequence[str]) -> str:
    """Keys summarised by their first two name components, with counts."""
    groups: Dict[str, int] = defaultdict(int)
    for key in keys:
        groups[".".join(key.split(".")[:2])] += 1
    return ", ".join(f"{name} ({count})" for name, count in sorted(groups.items()))


def check_plan(plan: LoadPlan, path: str, checkpoint_format: CheckpointFormat) -> None:
    """Raise `CheckpointError` for missing keys, shape mismatches or no overlap at all."""
    problems = []
    if plan.missing:
        problems.append(
            f"{len(plan.missing)} keys the model needs are missing (first: "
            f"{plan.missing[:SHOWN_KEYS]}; by module: {_group(plan.missing)})")
    if plan.shape_mismatch:
        shown = "; ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}"
                          for k, a, b in plan.shape_mismatch[:SHOWN_KEYS])
        problems.append(
            f"{len(plan.shape_mismatch)} tensors have another shape than the model's (first: {shown})")
    if not problems and not plan.loaded:
        problems.append("none of its keys belongs to this model")
    if problems:
        raise CheckpointError(
            f"{path} (read as {checkpoint_format.name!r}): " + "; and ".join(problems)
            + ". Is it the checkpoint of another architecture or backbone, or does the config "
            "(classes, queries, depth, widths) differ from the one it was trained with? Nothing "
            "was loaded. If this is intended (e.g. a new class head), list the key prefixes in "
            "MODEL.WEIGHTS_ALLOW_MISSING; they keep their initialisation."
        )


class OpenSegCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer reading every supported layout into openseg names, strictly.

    Subclasses (the training checkpointer) inherit the reading and loading; saving is
    detectron2's. `allow_missing`: openseg key prefixes that may be absent from, or shaped
    differently in, the weights (``MODEL.WEIGHTS_ALLOW_MISSING``).
    """

    def __init__(self, model: nn.Module, save_dir: str = "", *,
                 allow_missing: Sequence[str] = (), **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        self.allow_missing = tuple(allow_missing)

    @classmethod
    def from_config(cls, cfg: CfgNode, model: nn.Module, save_dir: str = "",
                    **kwargs: Any) -> "OpenSegCheckpointer":
        return cls(model, save_dir, allow_missing=cfg.MODEL.WEIGHTS_ALLOW_MISSING, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        checkpoint = read_checkpoint_file(filename)
        state, checkpoint_format = convert_to_openseg(checkpoint["model"], filename)
        checkpoint["model"] = state
        checkpoint["__openseg_format__"] = checkpoint_format.name
        checkpoint["__path__"] = filename
        return checkpoint

    def _load_model(self, checkpoint: Dict[str, Any]) -> _IncompatibleKeys:
        path = checkpoint.pop("__path__", "<checkpoint>")
        checkpoint_format = CHECKPOINT_FORMATS[checkpoint.pop("__openseg_format__")]
        model_state = self.model.state_dict()
        state = checkpoint.pop("model")  # as fvcore does: load() returns the other entries
        plan = plan_load(model_state, state, checkpoint_format, self.allow_missing)
        check_plan(plan, path, checkpoint_format)
        self.logger.info(
            "%s: read as %r (%s): %d tensors loaded", path, checkpoint_format.name,
            checkpoint.get("__author__", "unknown"), len(plan.loaded),
        )
        self.model.load_state_dict({k: state[k] for k in plan.loaded}, strict=False)
        if plan.skipped_shapes:
            self.logger.info("MODEL.WEIGHTS_ALLOW_MISSING: shapes differ, kept at initialisation: %s",
                             plan.skipped_shapes)
        return _IncompatibleKeys(
            missing_keys=plan.kept_initialisation + plan.skipped_shapes,
            unexpected_keys=plan.unused,
            incorrect_shapes=[],
        )

    def _log_incompatible_keys(self, incompatible: _IncompatibleKeys) -> None:
        if incompatible.missing_keys:
            self.logger.info(
                "Left at initialisation (%d keys the weights do not hold or that "
                "MODEL.WEIGHTS_ALLOW_MISSING exempts): %s",
                len(incompatible.missing_keys), _group(incompatible.missing_keys),
            )
        if incompatible.unexpected_keys:
            self.logger.info(
                "Unused keys of the weights (%d): %s", len(incompatible.unexpected_keys),
                _group(incompatible.unexpected_keys),
            )


# ------------------------------------------------------------------------------ built-in formats
def _has(keys: Sequence[str], *patterns: str) -> bool:
    return all(any(re.match(p, k) for k in keys) for p in patterns)


def _prefixed(state: StateDict, prefix: str) -> StateDict:
    return {prefix + k: v for k, v in state.items()}


def _strip_prefix(state: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# openseg's own checkpoints, of any method: the model's own names. Tried last, so a file no
# other format recognises is compared with the model as it is (and fails naming the keys).
register_checkpoint_format(CheckpointFormat(
    name="openseg",
    detect=lambda keys: True,
    to_openseg=dict,
    from_openseg=dict,
    priority=-100,
))

# detectron2 ResNet (torchvision-converted R-50.pkl / R-101.pkl of Mask2Former's model zoo):
# stem.conv1.*, res2.0.conv1.norm.*, ...; the classifier (`stem.fc`) is logged as unused
register_checkpoint_format(CheckpointFormat(
    name="detectron2_resnet",
    detect=lambda keys: _has(keys, r"stem\.conv1\.", r"res2\.0\.conv1\.")
    and not _has(keys, r"backbone\."),
    to_openseg=lambda state: _prefixed(state, "backbone."),
    from_openseg=lambda state: _strip_prefix(state, "backbone."),
    scope="backbone",
))


def _torchvision_resnet_to_d2(name: str) -> str:
    """torchvision ResNet names -> detectron2's (what Mask2Former's
    `tools/convert-torchvision-to-d2.py` does before writing R-50.pkl)."""
    if not name.startswith("layer"):
        name = "stem." + name
    name = re.sub(r"layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", name)
    name = re.sub(r"\bbn(\d)\.", r"conv\1.norm.", name)
    return name.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


register_checkpoint_format(CheckpointFormat(
    name="torchvision_resnet",
    detect=lambda keys: _has(keys, r"conv1\.weight$", r"layer1\.0\.conv1\.weight$"),
    to_openseg=lambda state: {"backbone." + _torchvision_resnet_to_d2(k): v for k, v in state.items()},
    scope="backbone",
))


def _caffe2_resnet_to_openseg(state: StateDict) -> StateDict:
    """detectron2's renaming of Caffe2 ResNet blobs, under ``backbone.``."""
    return {"backbone." + new: state[old] for old, new in zip(state, convert_basic_c2_names(list(state)))}


# MSRA's Caffe2 ResNets (ImageNetPretrained/MSRA/R-50.pkl): res2_0_branch2a_w, res_conv1_bn_s, ...
# They carry frozen affine BN without running statistics: those keep their (0, 1) initialisation.
register_checkpoint_format(CheckpointFormat(
    name="caffe2_resnet",
    detect=lambda keys: _has(keys, r"res2_0_branch2a_w$"),
    to_openseg=_caffe2_resnet_to_openseg,
    scope="backbone",
    never_holds=(r"\.norm\.running_(mean|var)$",),
))

# Swin ImageNet classification weights as Mask2Former's convert script pickles them
# (patch_embed.*, layers.<i>.blocks.<j>.*, norm.*, head.*): the classifier `head` and the
# final `norm` are unused; the per-stage output norms `norm0`..`norm3` are new in detection.
register_checkpoint_format(CheckpointFormat(
    name="swin_imagenet",
    detect=lambda keys: _has(keys, r"patch_embed\.proj\.weight$", r"layers\.0\.blocks\.0\.")
    and not _has(keys, r"backbone\."),
    to_openseg=lambda state: _prefixed(state, "backbone."),
    scope="backbone",
    never_holds=(r"^backbone\.norm[0-3]\.",),
))
