"""The optimizer runs PyTorch's fused kernels when it can, with the per-tensor update's results."""

import copy

import pytest
import torch
from torch import nn

from openseg.config import load_config
from openseg.engine.optimizer import build_optimizer


def _cfg(optimizer: str):
    return load_config(None, [
        "SOLVER.OPTIMIZER", optimizer, "SOLVER.BASE_LR", "0.01", "SOLVER.MOMENTUM", "0.9",
        "SOLVER.WEIGHT_DECAY", "0.05", "SOLVER.WEIGHT_DECAY_NORM", "0.0",
        "SOLVER.BACKBONE_MULTIPLIER", "0.1", "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.5",
    ])


def _model():
    torch.manual_seed(0)
    return nn.ModuleDict({
        "backbone": nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)),
        "head": nn.Linear(6, 3),
    })


def _loss(model, x):
    return (model["head"](model["backbone"](x)) ** 2).sum()


def _per_tensor_optimizer(model, optimizer_cls, **kwargs):
    """Mask2Former's groups by hand (backbone lr x 0.1, no decay on the norm) for PyTorch's
    per-tensor-loop optimizer."""
    backbone, norm = model["backbone"][0], model["backbone"][1]
    groups = [
        {"params": list(backbone.parameters()), "lr": 0.001, "weight_decay": 0.05},
        {"params": list(norm.parameters()), "lr": 0.001, "weight_decay": 0.0},
        {"params": list(model["head"].parameters()), "lr": 0.01, "weight_decay": 0.05},
    ]
    return optimizer_cls(groups, lr=0.01, foreach=False, **kwargs)


@pytest.mark.parametrize("name", ["ADAMW", "SGD"])
def test_fused_update_equals_per_tensor_loop(name):
    model = _model()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(_cfg(name), model)
    assert optimizer.defaults["fused"] is True
    optimizer_cls, kwargs = (
        (torch.optim.AdamW, {}) if name == "ADAMW" else (torch.optim.SGD, {"momentum": 0.9})
    )
    manual = _per_tensor_optimizer(reference, optimizer_cls, **kwargs)
    for step in range(3):  # several steps: moments / momentum buffers carry over
        x = torch.randn(5, 4)
        for net in (model, reference):
            for p in net.parameters():
                p.grad = None
            _loss(net, x).backward()
        optimizer.step()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        assert norm > 0.5  # the full-model clipping is active
        manual.step()
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=f"step {step}")


def test_unsupported_device_falls_back_to_unfused():
    """Fused kernels exist for CPU and CUDA only; other devices keep PyTorch's default."""
    model = _model().to("meta")
    optimizer = build_optimizer(_cfg("ADAMW"), model)
    assert not optimizer.defaults.get("fused")
