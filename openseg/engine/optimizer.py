"""Optimizer and LR schedule of Mask2Former-style training (Cheng et al. 2022, Sec. 4 / App. A):
AdamW, a smaller learning rate for the backbone, no weight decay on norms and embeddings,
full-model gradient clipping and a poly schedule."""
import itertools
from typing import Any, Dict, List, Type

import torch
from detectron2.config import CfgNode
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import ParamScheduler
from torch import nn

NORM_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)


def optimizer_param_groups(cfg: CfgNode, model: nn.Module) -> List[Dict[str, Any]]:
    """One group per trainable parameter with its own lr / weight decay.

    Parameters under `model.backbone` get `SOLVER.BACKBONE_MULTIPLIER` x lr; norm layers get
    `SOLVER.WEIGHT_DECAY_NORM`, embeddings `SOLVER.WEIGHT_DECAY_EMBED`. Frozen parameters
    (e.g. a frozen CLIP) are left out, so the optimizer state holds only what trains.
    """
    base_lr, weight_decay = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
    groups: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr, decay = base_lr, weight_decay
            if module_name == "backbone" or module_name.startswith("backbone."):
                lr = base_lr * cfg.SOLVER.BACKBONE_MULTIPLIER
            if isinstance(module, NORM_MODULES):
                decay = cfg.SOLVER.WEIGHT_DECAY_NORM
            elif isinstance(module, nn.Embedding) or "relative_position_bias_table" in param_name \
                    or "absolute_pos_embed" in param_name:
                decay = cfg.SOLVER.WEIGHT_DECAY_EMBED
            groups.append({"params": [param], "lr": lr, "weight_decay": decay})
    return groups


def _with_full_model_clipping(optim_cls: Type[torch.optim.Optimizer], max_norm: float):
    """Clip the gradient norm over all parameters together (Mask2Former's "full_model"),
    which detectron2's per-parameter clipping does not offer."""

    class FullModelClippingOptimizer(optim_cls):
        def step(self, closure=None):
            params = itertools.chain(*[group["params"] for group in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure=closure)

    return FullModelClippingOptimizer


def _fused_if_supported(groups: List[Dict[str, Any]]) -> Dict[str, bool]:
    """`fused=True` when every parameter is a floating-point tensor on CPU or CUDA.

    PyTorch's fused AdamW / SGD update all parameters of a group in one kernel; without it
    CPU runs a per-tensor loop (more than twice as slow for Mask2Former R50: 0.4 s instead of
    0.9 s per step with gradient clipping, 1 thread, benchmarks/bench_vs_reference.py), and
    CUDA the multi-tensor (foreach) path. The update is the same up to rounding."""
    params = [param for group in groups for param in group["params"]]
    supported = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if supported else {}


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW (`SOLVER.OPTIMIZER`) over `optimizer_param_groups`, with gradient clipping
    from `SOLVER.CLIP_GRADIENTS` (CLIP_TYPE "full_model", "value" or "norm").

    Parameters with equal hyper-parameters share one group, so the fused (or multi-tensor)
    update runs over them together instead of once per tensor."""
    groups = reduce_param_groups(optimizer_param_groups(cfg, model))
    if not groups:
        raise ValueError("the model has no trainable parameters: check the FROZEN config keys")
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "SGD":
        optim_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
    elif name == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, {}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER = {cfg.SOLVER.OPTIMIZER!r}: use 'SGD' or 'ADAMW'")
    kwargs.update(_fused_if_supported(groups))
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = _with_full_model_clipping(optim_cls, clip.CLIP_VALUE)
        return optim_cls(groups, cfg.SOLVER.BASE_LR, **kwargs)
    return maybe_add_gradient_clipping(cfg, optim_cls)(groups, cfg.SOLVER.BASE_LR, **kwargs)


class PolyParamScheduler(ParamScheduler):
    """(1 - t)^power, held at `constant_ending` once it would fall below it (t in [0, 1])."""

    def __init__(self, power: float, constant_ending: float = 0.0):
        self.power = power
        self.constant_ending = constant_ending

    def __call__(self, where: float) -> float:
        return max((1.0 - where) ** self.power, self.constant_ending)


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer):
    """detectron2's schedules plus "WarmupPolyLR" (Mask2Former's default)."""
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupPolyLR":
        return d2_build_lr_scheduler(cfg, optimizer)
    sched = WarmupParamScheduler(
        PolyParamScheduler(cfg.SOLVER.POLY_LR_POWER, cfg.SOLVER.POLY_LR_CONSTANT_ENDING),
        cfg.SOLVER.WARMUP_FACTOR,
        min(cfg.SOLVER.WARMUP_ITERS / cfg.SOLVER.MAX_ITER, 1.0),
        cfg.SOLVER.WARMUP_METHOD,
    )
    return LRMultiplier(optimizer, multiplier=sched, max_iter=cfg.SOLVER.MAX_ITER)
