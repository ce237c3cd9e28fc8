"""Optimizer grouping, poly schedule, full-model clipping and config errors."""

import copy

import pytest
import torch
from torch import nn

from openseg.config import load_config
from openseg.engine.optimizer import (
    PolyParamScheduler,
    build_lr_scheduler,
    build_optimizer,
    optimizer_param_groups,
)


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.query_embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 2)


def _cfg(*opts):
    return load_config(
        None,
        [
            "SOLVER.BASE_LR",
            "0.01",
            "SOLVER.WEIGHT_DECAY",
            "0.05",
            "SOLVER.WEIGHT_DECAY_NORM",
            "0.0",
            "SOLVER.WEIGHT_DECAY_EMBED",
            "0.0",
            "SOLVER.BACKBONE_MULTIPLIER",
            "0.1",
            *opts,
        ],
    )


def test_param_groups_follow_the_rules_by_hand():
    model = ToyModel()
    groups = optimizer_param_groups(_cfg(), model)
    by_param = {id(g["params"][0]): (g["lr"], g["weight_decay"]) for g in groups}
    expected = {
        id(model.backbone[0].weight): (0.001, 0.05),
        id(model.backbone[0].bias): (0.001, 0.05),
        id(model.backbone[1].weight): (0.001, 0.0),
        id(model.backbone[1].bias): (0.001, 0.0),
        id(model.query_embed.weight): (0.01, 0.0),
        id(model.head.weight): (0.01, 0.05),
        id(model.head.bias): (0.01, 0.05),
    }
    assert by_param.keys() == expected.keys()  # frozen parameters are left out
    for key, (lr, decay) in expected.items():
        assert by_param[key] == (pytest.approx(lr), decay)


def test_poly_schedule_matches_formula_and_constant_ending():
    sched = PolyParamScheduler(0.9, 0.0)
    for t in (0.0, 0.25, 0.5, 0.99):
        assert sched(t) == pytest.approx((1 - t) ** 0.9)
    assert PolyParamScheduler(0.9, 0.2)(0.99) == pytest.approx(0.2)


def test_poly_lr_scheduler_steps_like_the_formula():
    cfg = _cfg(
        "SOLVER.LR_SCHEDULER_NAME",
        "WarmupPolyLR",
        "SOLVER.MAX_ITER",
        "10",
        "SOLVER.WARMUP_ITERS",
        "0",
        "SOLVER.POLY_LR_POWER",
        "2.0",
    )
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.01 * (1 - i / 10) ** 2 for i in range(5)])


def test_full_model_clipping_equals_manual_clip_then_step():
    torch.manual_seed(0)
    cfg = _cfg(
        "SOLVER.CLIP_GRADIENTS.ENABLED",
        "True",
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
        "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
        "0.01",
        "SOLVER.WEIGHT_DECAY",
        "0.0",
    )
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    reference = copy.deepcopy(model)
    x = torch.randn(8, 3)
    for net in (model, reference):
        (net(x) ** 2).sum().mul(100).backward()
    build_optimizer(cfg, model).step()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
    torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.0).step()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("MODEL:\n  MASK_FORMER:\n    NUM_OBJECT_QUERIESS: 3\n")
    with pytest.raises(KeyError) as err:
        load_config(str(config))
    assert "bad.yaml" in str(err.value) and "NUM_OBJECT_QUERIESS" in str(err.value)


def test_unknown_override_names_key():
    with pytest.raises(KeyError, match="SOLVER.NOT_A_KEY"):
        load_config(None, ["SOLVER.NOT_A_KEY", "1"])


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(_cfg("SOLVER.OPTIMIZER", "LION"), nn.Linear(2, 2))
