"""Pre-training of the demo CLIPs (openseg.modeling.demo_clip, tools/pretrain_demo_clip.py):
the multi-positive InfoNCE by hand and against CLIP's loss, disjoint renders, a few steps lower
the loss, and the written state dict loads through MODEL.CLIP.PRETRAINED_PATH."""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from script_utils import load_script
from detectron2.modeling import build_model

from openseg.config import load_config
from openseg.data.datasets.demo import ALL_CLASSES, SEED_STREAMS, render_image
from openseg.modeling.backbones.clip import build_openclip_backbone
from openseg.modeling.demo_clip import (
    logit_scale,
    multi_positive_infonce,
    pretrain,
    render_batch,
    segment_embeddings,
    synonym_embeddings,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FCCLIP_DEMO = os.path.join(ROOT, "configs", "demo", "fcclip_tiny_convnext.yaml")
MAFTPLUS_DEMO = os.path.join(ROOT, "configs", "demo", "maftplus_pico_convnext.yaml")


def load_tool():
    return load_script("tools/pretrain_demo_clip.py")


def test_one_positive_per_row_and_column_is_clips_loss():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    target = torch.arange(5)
    clip = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    assert torch.allclose(multi_positive_infonce(logits, torch.eye(5, dtype=torch.bool)), clip)


def test_multi_positive_infonce_by_hand():
    # 2 regions x 3 texts; region 0 has positives {0, 1}, region 1 has {2}; text columns:
    # 0 -> {0}, 1 -> {0}, 2 -> {1}
    logits = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]])
    positives = torch.tensor([[True, True, False], [False, False, True]])
    row0 = -0.5 * ((1 - math.log(math.e + 1 + math.e**2)) + (0 - math.log(math.e + 1 + math.e**2)))
    row1 = -(0 - math.log(math.exp(0.5) + math.exp(-1) + 1))
    col0 = -(1 - math.log(math.e + math.exp(0.5)))
    col1 = -(0 - math.log(1 + math.exp(-1)))
    col2 = -(0 - math.log(math.e**2 + 1))
    expected = 0.5 * ((row0 + row1) / 2 + (col0 + col1 + col2) / 3)
    assert math.isclose(float(multi_positive_infonce(logits, positives)), expected, rel_tol=1e-6)
    # a column without positives (class absent from the batch) is left out
    with_empty = torch.cat([logits, torch.full((2, 1), 5.0)], dim=1)
    no_positive = torch.cat([positives, torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    rows_only = 0.5 * (
        (-0.5 * ((1 - math.log(math.e + 1 + math.e**2 + math.e**5)) + (0 - math.log(math.e + 1 + math.e**2 + math.e**5)))
         - (0 - math.log(math.exp(0.5) + math.exp(-1) + 1 + math.e**5))) / 2
        + (col0 + col1 + col2) / 3
    )
    assert math.isclose(float(multi_positive_infonce(with_empty, no_positive)), rows_only, rel_tol=1e-6)


def test_pretraining_renders_are_not_dataset_images_and_hold_every_class():
    assert len(set(SEED_STREAMS.values())) == len(SEED_STREAMS)
    dataset = {render_image(split, i)[0].tobytes() for split in ("train", "val") for i in range(24)}
    names = set()
    for stream in ("clip_pretrain", "clip_held_out"):
        for index in range(24):
            image, segments = render_image(stream, index)
            assert image.tobytes() not in dataset
            names |= {name for name, _ in segments}
    assert names == set(ALL_CLASSES)  # the unseen "cross" and "sand" too
    assert {name for i in range(24) for name, _ in render_image("train", i)[1]} == set(ALL_CLASSES) - {
        "cross", "sand"}


def _maftplus_backbone():
    cfg = load_config(MAFTPLUS_DEMO)
    cfg.MODEL.CLIP.FROZEN = False
    torch.manual_seed(0)
    return build_openclip_backbone(cfg, None)


def _loss_on(backbone, batch) -> float:
    images, masks, labels, owners = batch
    with torch.no_grad():
        regions = segment_embeddings(backbone, images, masks, owners)
        texts, text_labels = synonym_embeddings(backbone, ["{}"])
        logits = logit_scale(backbone) * regions @ texts.t()
        return float(multi_positive_infonce(logits, labels[:, None] == text_labels[None, :]))


def test_a_few_steps_lower_the_loss_on_fixed_renders():
    backbone = _maftplus_backbone()
    batch = render_batch("clip_held_out", range(8))
    before = _loss_on(backbone, batch)
    losses = pretrain(backbone, ["{}"], steps=8, batch_size=2, lr=3e-3, log_period=0)
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert _loss_on(backbone, batch) < before - 0.5  # 4.74 -> 3.87


def test_written_clip_loads_into_the_fcclip_demo_model(tmp_path, capsys):
    output = str(tmp_path / "clip.pt")
    accuracy = load_tool().main(
        ["--config-file", FCCLIP_DEMO, "--output", output, "--steps", "1", "--batch-size", "2",
         "--held-out-images", "2"]
    )
    assert set(accuracy) == set(ALL_CLASSES)
    assert "mean unseen" in capsys.readouterr().out
    saved = torch.load(output, map_location="cpu")
    cfg = load_config(FCCLIP_DEMO, ["MODEL.CLIP.PRETRAINED_PATH", output])
    model = build_model(cfg)
    loaded = model.backbone.clip_model.state_dict()
    assert set(loaded) == set(saved)
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name
