"""openseg's Swin backbone computes what Mask2Former's `D2SwinTransformer` computes.

Fixtures: tools/reference_fixtures/swin.py (tiny random Swins from the release, a 50 x 77
input that is a multiple of neither the patch nor the window size)."""
from pathlib import Path

import pytest
import torch
from detectron2.layers import ShapeSpec

from openseg.checkpoint import OpenSegCheckpointer, convert_to_openseg
from openseg.config import load_config
from openseg.modeling.backbones.swin import D2SwinTransformer, shifted_window_mask

FIXTURES = Path(__file__).parent / "fixtures" / "reference" / "swin"


def swin_cfg(options: dict):
    cfg = load_config()
    for key, value in options.items():
        setattr(cfg.MODEL.SWIN, key, value)
    return cfg


class Wrapper(torch.nn.Module):
    """A model whose backbone is the Swin, as meta-architectures hold it."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def load_fixture(name: str):
    fixture = torch.load(FIXTURES / f"swin_{name}.pt", weights_only=False)
    model = D2SwinTransformer(swin_cfg(fixture["options"]), ShapeSpec(channels=3)).eval()
    state = {"backbone." + k: v for k, v in fixture["state_dict"].items()}
    converted, _ = convert_to_openseg(state, "fixture", "openseg")
    Wrapper(model).load_state_dict(converted, strict=True)
    return fixture, model


@pytest.mark.parametrize("name", ["ape", "plain"])
def test_swin_features_equal_reference(name):
    fixture, model = load_fixture(name)
    with torch.no_grad():
        outputs = model(fixture["input"])
    assert sorted(outputs) == ["res2", "res3", "res4", "res5"]
    for key, expected in fixture["outputs"].items():
        assert outputs[key].shape == expected.shape, key
        torch.testing.assert_close(outputs[key], expected, rtol=0, atol=1e-5, msg=key)
    shapes = model.output_shape()
    assert [shapes[k].stride for k in ("res2", "res3", "res4", "res5")] == [4, 8, 16, 32]
    assert [shapes[k].channels for k in ("res2", "res3", "res4", "res5")] == [8, 16, 32, 64]


def test_out_features_subset_equals_reference_subset():
    fixture, model = load_fixture("plain")
    model._out_features = ["res3", "res5"]
    with torch.no_grad():
        outputs = model(fixture["input"])
    assert sorted(outputs) == ["res3", "res5"]
    torch.testing.assert_close(outputs["res3"], fixture["outputs"]["res3"], rtol=0, atol=1e-5)


def test_shifted_window_mask_separates_regions_hand_computed():
    # 4 x 4 map, window 2, shift 1: regions per axis [0, 0, 1, 2]; the last window (rows 2-3,
    # cols 2-3) holds regions (1,1), (1,2), (2,1), (2,2): no position sees another region
    mask = shifted_window_mask(4, 4, 2, 1, torch.device("cpu"))
    assert mask.shape == (4, 4, 4)
    assert torch.equal(mask[0], torch.zeros(4, 4))
    assert torch.equal(mask[3] == 0, torch.eye(4, dtype=torch.bool))
    assert mask[3][0, 1].item() == -100.0
    # window (rows 0-1, cols 2-3): columns 2 and 3 are regions 1 and 2
    assert torch.equal(mask[1] == 0, torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1],
                                                   [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool))


def test_swin_imagenet_weights_load_through_checkpointer():
    """The pickle Mask2Former's convert-pretrained-swin-model-to-d2.py writes: every backbone
    tensor is loaded; `head` / final `norm` unused; the detection norms norm0..3 are new."""
    fixture = torch.load(FIXTURES / "swin_plain.pt", weights_only=False)
    model = Wrapper(D2SwinTransformer(swin_cfg(fixture["options"]), ShapeSpec(channels=3)))
    checkpointer = OpenSegCheckpointer(model)
    result = checkpointer._load_model(checkpointer._load_file(str(FIXTURES / "swin_plain_imagenet.pkl")))
    loaded = model.state_dict()
    for key, value in fixture["state_dict"].items():
        if key.startswith("norm") or key.endswith("relative_position_index"):
            continue
        assert torch.equal(loaded["backbone." + key], value), key
    assert sorted(result.unexpected_keys) == ["backbone.head.bias", "backbone.head.weight",
                                              "backbone.norm.bias", "backbone.norm.weight"]
    assert sorted(result.missing_keys) == sorted(
        f"backbone.norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
