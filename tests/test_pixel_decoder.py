"""Deformable attention against a hand-written bilinear reference; pixel decoder shapes/gradients."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

from openseg.config import add_openseg_config
from openseg.modeling.pixel_decoder import (
    MSDeformAttn,
    MSDeformAttnEncoder,
    build_pixel_decoder,
    ms_deform_attn_core,
)
from openseg.modeling.position_encoding import PositionEmbeddingSine


def _bilinear_by_hand(image, x, y):
    """image [H, W, D]; (x, y) continuous with pixel i centred at i + 0.5; zero outside."""
    height, width, dim = image.shape
    px, py = x - 0.5, y - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = torch.zeros(dim, dtype=image.dtype)
    for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            if 0 <= xi < width and 0 <= yi < height:
                total += wx * wy * image[yi, xi]
    return total


def _naive_deform_attn(value, shapes, starts, locations, weights):
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads * head_dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                acc = torch.zeros(head_dim, dtype=value.dtype)
                for lvl in range(levels):
                    height, width = shapes[lvl]
                    image = value[b, starts[lvl] : starts[lvl] + height * width, h].reshape(
                        height, width, head_dim
                    )
                    for p in range(points):
                        x = float(locations[b, q, h, lvl, p, 0]) * width
                        y = float(locations[b, q, h, lvl, p, 1]) * height
                        acc += weights[b, q, h, lvl, p] * _bilinear_by_hand(image, x, y)
                out[b, q, h * head_dim : (h + 1) * head_dim] = acc
    return out


def test_ms_deform_attn_core_matches_naive_bilinear():
    torch.manual_seed(0)
    shapes = [(3, 5), (2, 4), (1, 3)]  # non-square levels
    starts = [0, 15, 23]
    total = sum(h * w for h, w in shapes)
    batch, queries, heads, head_dim, points = 2, 4, 2, 3, 3
    value = torch.randn(batch, total, heads, head_dim, dtype=torch.float64)
    # include locations slightly outside [0, 1] to exercise zero padding
    locations = (
        torch.rand(batch, queries, heads, len(shapes), points, 2, dtype=torch.float64) * 1.4 - 0.2
    )
    weights = torch.rand(batch, queries, heads, len(shapes), points, dtype=torch.float64)
    got = ms_deform_attn_core(
        value,
        torch.tensor(shapes, dtype=torch.long),
        torch.tensor(starts, dtype=torch.long),
        locations,
        weights,
    )
    expected = _naive_deform_attn(value, shapes, starts, locations, weights)
    assert got.shape == (batch, queries, heads * head_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_encoder_spatial_shapes_and_reference_points_non_square():
    torch.manual_seed(0)
    encoder = MSDeformAttnEncoder(
        d_model=8, n_heads=2, num_layers=1, d_ffn=16, dropout=0.0, n_levels=2, n_points=2
    )
    sources = [torch.randn(1, 8, 2, 3), torch.randn(1, 8, 4, 5)]
    memory, shapes, starts = encoder(sources, [torch.zeros_like(s) for s in sources])
    assert shapes.tolist() == [[2, 3], [4, 5]]
    assert starts.tolist() == [0, 6]
    assert memory.shape == (1, 26, 8)
    ref = MSDeformAttnEncoder.reference_points(shapes, 2, torch.device("cpu"))
    assert ref.shape == (1, 26, 2, 2)
    # token 4 of level 0 is row 1, col 1 of a 2x3 map: centre ((1+0.5)/3, (1+0.5)/2)
    torch.testing.assert_close(ref[0, 4, 0], torch.tensor([1.5 / 3, 1.5 / 2]))
    # first token of level 1 (4x5): (0.5/5, 0.5/4)
    torch.testing.assert_close(ref[0, 6, 1], torch.tensor([0.1, 0.125]))


def test_msdeformattn_zero_offsets_samples_reference_pixel():
    """With zero offsets and a reference point at a pixel centre, the output is that pixel's value."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=4, n_levels=1, n_heads=1, n_points=1)
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
        attn.value_proj.weight.copy_(torch.eye(4))
        attn.output_proj.weight.copy_(torch.eye(4))
    values = torch.randn(1, 6, 4)  # a 2x3 map
    ref = torch.tensor([[[[2.5 / 3, 0.5 / 2]]]])  # row 0, col 2
    out = attn(torch.randn(1, 1, 4), ref, values, torch.tensor([[2, 3]]), torch.tensor([0]))
    torch.testing.assert_close(out[0, 0], values[0, 2])


def test_position_embedding_sine_hand_values():
    pe = PositionEmbeddingSine(2, temperature=10000, normalize=False)(torch.zeros(1, 1, 2, 3))
    assert pe.shape == (1, 4, 2, 3)
    # channels: sin(y), cos(y) (dim_t = 1 for both), then sin(x), cos(x); positions count from 1
    assert torch.allclose(pe[0, 0, 1, 2], torch.tensor(math.sin(2.0)))
    assert torch.allclose(pe[0, 1, 1, 2], torch.tensor(math.cos(2.0)))
    assert torch.allclose(pe[0, 2, 1, 2], torch.tensor(math.sin(3.0)))
    assert torch.allclose(pe[0, 3, 0, 0], torch.tensor(math.cos(1.0)))


def _tiny_cfg(enc_layers: int):
    cfg = get_cfg()
    add_openseg_config(cfg)
    head = cfg.MODEL.SEM_SEG_HEAD
    head.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    head.CONVS_DIM = 32
    head.MASK_DIM = 32
    head.NORM = "GN"
    head.TRANSFORMER_ENC_LAYERS = enc_layers
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 2
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 2
    cfg.MODEL.MASK_FORMER.NHEADS = 2  # the release's encoder head count
    return cfg


_SHAPES = {
    "res2": ShapeSpec(channels=8, stride=4),
    "res3": ShapeSpec(channels=16, stride=8),
    "res4": ShapeSpec(channels=24, stride=16),
    "res5": ShapeSpec(channels=40, stride=32),
}


@pytest.mark.parametrize("enc_layers", [0, 1])
def test_pixel_decoder_shapes_and_gradient(enc_layers):
    torch.manual_seed(0)
    decoder = build_pixel_decoder(_tiny_cfg(enc_layers), _SHAPES)
    height, width = 64, 96
    features = {
        name: torch.randn(2, s.channels, height // s.stride, width // s.stride, requires_grad=True)
        for name, s in _SHAPES.items()
    }
    mask_features, multi_scale = decoder.forward_features(features)
    assert mask_features.shape == (2, 32, height // 4, width // 4)
    assert [tuple(m.shape) for m in multi_scale] == [
        (2, 32, height // 32, width // 32),
        (2, 32, height // 16, width // 16),
        (2, 32, height // 8, width // 8),
    ]
    (mask_features.sum() + sum(m.sum() for m in multi_scale)).backward()
    for name, tensor in features.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name
    trainable = [p for p in decoder.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    if enc_layers:
        offsets = decoder.transformer.layers[0].self_attn.sampling_offsets.weight
        assert offsets.grad.abs().sum() > 0
        assert decoder.transformer.layers[0].self_attn.n_heads == 2
    # the release keeps the level embedding without encoder layers (its checkpoints have it);
    # unused then, it must not train (DDP rejects parameters without gradient)
    level_embed = decoder.transformer.level_embed
    assert tuple(level_embed.shape) == (3, 32)
    assert "transformer.level_embed" in decoder.state_dict()
    assert level_embed.requires_grad == bool(enc_layers)


def test_pixel_decoder_heads_follow_mask_former_nheads():
    """The release builds the encoder with MODEL.MASK_FORMER.NHEADS heads; a different
    DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS would be silently ignored there, so it is an error."""
    cfg = _tiny_cfg(1)
    cfg.MODEL.MASK_FORMER.NHEADS = 4
    with pytest.raises(ValueError, match="DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS=2 differs"):
        build_pixel_decoder(cfg, _SHAPES)
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 4
    assert build_pixel_decoder(cfg, _SHAPES).transformer.layers[0].self_attn.n_heads == 4


def test_pixel_decoder_rejects_missing_features():
    cfg = _tiny_cfg(1)
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res6"]
    with pytest.raises(ValueError, match="IN_FEATURES"):
        build_pixel_decoder(cfg, _SHAPES)


def test_pixel_decoder_runs_in_float32_under_autocast():
    """As the release (autocast disabled, inputs cast to float32): mixed precision does not
    reach the deformable encoder: outputs equal the float32 computation on the same (bfloat16)
    inputs exactly."""
    torch.manual_seed(0)
    decoder = build_pixel_decoder(_tiny_cfg(1), _SHAPES).eval()
    features = {
        name: torch.randn(1, s.channels, 64 // s.stride, 96 // s.stride) for name, s in _SHAPES.items()
    }
    with torch.no_grad():
        expected, _ = decoder.forward_features(features)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            mixed, mixed_levels = decoder.forward_features(
                {k: v.to(torch.bfloat16) for k, v in features.items()}
            )
    assert mixed.dtype == torch.float32 and all(m.dtype == torch.float32 for m in mixed_levels)
    with torch.no_grad():
        rounded = {k: v.to(torch.bfloat16).float() for k, v in features.items()}
        reference, reference_levels = decoder.forward_features(rounded)
    assert torch.equal(mixed, reference)
    assert all(torch.equal(a, b) for a, b in zip(mixed_levels, reference_levels))
    assert not torch.equal(expected, reference)  # the inputs really were rounded
