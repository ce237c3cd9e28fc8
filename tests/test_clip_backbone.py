"""open_clip backbones on tiny random-init models, checked against open_clip / timm's own paths."""

import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from openseg.config import add_openseg_config
from openseg.modeling.backbones import (
    CLIP_DENSE_INPUT,
    OpenCLIPConvNeXtBackbone,
    OpenCLIPViTBackbone,
)

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "data", "open_clip")
open_clip.add_model_config(CONFIG_DIR)
CONVNEXT = "openseg-test-convnext"
VIT = "openseg-test-vit"


def _cfg(model_name: str, pretrained_path: str = "", frozen: bool = True):
    cfg = get_cfg()
    add_openseg_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_openclip_backbone"
    cfg.MODEL.CLIP.MODEL_NAME = model_name
    cfg.MODEL.CLIP.PRETRAINED_PATH = pretrained_path
    cfg.MODEL.CLIP.FROZEN = frozen
    return cfg


@pytest.fixture(scope="module")
def convnext():
    torch.manual_seed(0)
    return build_backbone(_cfg(CONVNEXT)).eval()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_backbone(_cfg(VIT)).eval()


def test_convnext_pyramid_matches_timm_stages(convnext):
    assert isinstance(convnext, OpenCLIPConvNeXtBackbone)
    images = torch.randn(2, 3, 64, 96)
    features = convnext(images)
    shapes = convnext.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "res2": (40, 4),
        "res3": (80, 8),
        "res4": (160, 16),
        "res5": (320, 32),
    }
    reference = convnext.clip_model.visual.trunk.forward_intermediates(
        images, intermediates_only=True
    )
    for name, expected in zip(("res2", "res3", "res4", "res5"), reference):
        stride = shapes[name].stride
        assert features[name].shape == (2, shapes[name].channels, 64 // stride, 96 // stride)
        torch.testing.assert_close(features[name], expected)


def test_convnext_dense_features_equal_global_embedding_on_one_pixel(convnext):
    """A 32x32 image has a 1x1 res5: pooling is the identity, so the dense feature must be
    exactly open_clip's own image embedding."""
    images = torch.randn(2, 3, 32, 32)
    dense = convnext.dense_clip_features(convnext(images))
    assert dense.shape == (2, 64, 1, 1)
    torch.testing.assert_close(
        dense[:, :, 0, 0], convnext.clip_model.encode_image(images), atol=1e-5, rtol=1e-5
    )
    # on a larger image every pixel is embedded separately (no pooling)
    dense = convnext.dense_clip_features(convnext(torch.randn(1, 3, 64, 96)))
    assert dense.shape == (1, 64, 2, 3)


def test_vit_pyramid_shapes_and_token_path(vit):
    assert isinstance(vit, OpenCLIPViTBackbone)
    shapes = vit.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "res2": (16, 4),
        "res3": (32, 8),
        "res4": (64, 16),
        "res5": (64, 32),
    }
    features = vit(torch.randn(2, 3, 64, 96))  # not the native 64x64: position embeddings resized
    for name, spec in shapes.items():
        assert features[name].shape == (2, spec.channels, 64 // spec.stride, 96 // spec.stride)
    # at the native size the class token of our token path gives open_clip's image embedding
    images = torch.randn(2, 3, 64, 64)
    _, last, grid = vit.vit_tokens(images)
    visual = vit.clip_model.visual
    assert grid == (4, 4)
    torch.testing.assert_close(
        visual.ln_post(last[:, 0]) @ visual.proj, vit.clip_model.encode_image(images)
    )


def test_vit_dense_features_are_maskclip_value_path(vit):
    images = torch.randn(2, 3, 64, 64)
    dense = vit.dense_clip_features(vit(images))
    visual = vit.clip_model.visual
    # penultimate tokens from open_clip's own intermediate API (output of block 0 of 2)
    penultimate = visual.forward_intermediates(images, indices=[0], intermediates_only=True)[
        "image_intermediates"
    ][0]
    tokens = penultimate.flatten(2).transpose(1, 2)  # [B, 16, 64]
    block = visual.transformer.resblocks[-1]
    normed = F.layer_norm(tokens, (64,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    w_v = block.attn.in_proj_weight[128:192]
    b_v = block.attn.in_proj_bias[128:192]
    value = normed @ w_v.T + b_v
    out = value @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    out = (
        F.layer_norm(out, (64,), visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps)
        @ visual.proj
    )
    expected = out.transpose(1, 2).reshape(2, 64, 4, 4)
    assert dense.shape == (2, 64, 4, 4)
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)


def test_freezing(vit):
    assert all(not p.requires_grad for p in vit.clip_model.parameters())
    trainable = [n for n, p in vit.named_parameters() if p.requires_grad]
    assert trainable and all(not n.startswith("clip_model.") for n in trainable)
    vit.train()
    assert vit.training and not vit.clip_model.training
    vit.eval()
    features = vit(torch.randn(1, 3, 64, 64))
    features["res2"].sum().backward()
    assert vit.pyramid_layers["res2"][0].weight.grad is not None
    unfrozen = build_backbone(_cfg(CONVNEXT, frozen=False))
    assert all(p.requires_grad for p in unfrozen.clip_model.parameters())


def test_out_features_subset():
    cfg = _cfg(CONVNEXT)
    cfg.MODEL.CLIP.OUT_FEATURES = ["res3", "res5"]
    backbone = build_backbone(cfg)
    assert set(backbone.output_shape()) == {"res3", "res5"}
    assert set(backbone(torch.randn(1, 3, 64, 64))) == {"res3", "res5", CLIP_DENSE_INPUT}
    cfg.MODEL.CLIP.MODEL_NAME = VIT
    backbone = build_backbone(cfg)
    assert set(backbone.pyramid_layers) == {"res3", "res5"}
    assert set(backbone(torch.randn(1, 3, 64, 64))) == {"res3", "res5", CLIP_DENSE_INPUT}


def test_text_encoder_and_normalisation(convnext):
    tokens = convnext.tokenize(["a photo of a cat", "a dog"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 16)
    embeddings = convnext.encode_text(tokens)
    assert embeddings.shape == (2, 64)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    assert convnext.pixel_mean == pytest.approx([255 * m for m in open_clip.OPENAI_DATASET_MEAN])
    assert convnext.pixel_std == pytest.approx([255 * s for s in open_clip.OPENAI_DATASET_STD])


def test_pretrained_path_errors_and_loading(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="PRETRAINED_PATH.*nope.pt"):
        build_backbone(_cfg(VIT, pretrained_path=missing))
    with pytest.raises(ValueError, match="convnext_large_d_320"):
        build_backbone(_cfg("convnext_large_d_32"))

    torch.manual_seed(1)
    source = open_clip.create_model(VIT, pretrained=None)
    checkpoint = str(tmp_path / "vit.pt")
    torch.save(source.state_dict(), checkpoint)
    torch.manual_seed(2)
    loaded = build_backbone(_cfg(VIT, pretrained_path=checkpoint))
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.clip_model.state_dict()[name], tensor), name


def test_rejects_wrong_input():
    with pytest.raises(ValueError, match="3 input channels"):
        build_backbone(_cfg(VIT), ShapeSpec(channels=1))
