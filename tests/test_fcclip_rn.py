"""FC-CLIP's ResNet-CLIP parts by hand: the masked attention pool, the released configs."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import openseg.projects.fcclip  # noqa: F401  (registers the tiny open_clip configs)
from openseg.config import load_config
from openseg.modeling.backbones import OpenCLIPResNetBackbone, build_openclip_backbone

TINY = "openseg-fcclip-tiny-rn"
# the release's ResNet-CLIP configs: CLIP_MODEL_NAME, EMBED_DIM and its backbone's hard-coded
# res2-res5 channels (bytedance/fc-clip fcclip/modeling/backbone/clip.py)
RELEASED = {
    "r50": ("RN50", 1024, [256, 512, 1024, 2048]),
    "r101": ("RN101", 512, [256, 512, 1024, 2048]),
    "r50x4": ("RN50x4", 640, [320, 640, 1280, 2560]),
    "r50x16": ("RN50x16", 768, [384, 768, 1536, 3072]),
    "r50x64": ("RN50x64", 1024, [512, 1024, 2048, 4096]),
}


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    model = OpenCLIPResNetBackbone(TINY, "", True, ["res2", "res3", "res4", "res5"])
    with torch.no_grad():
        for param in model.clip_model.visual.attnpool.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return model


def assert_close(actual, expected):
    """Within 1e-5 of the expected values' magnitude (float32 summation orders differ)."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=1e-5)


def _brute_force(backbone, features, attn_mask):
    """torch's own multi-head attention, one mask at a time: query = mean token + first
    position embedding, keys / values = tokens + bilinearly resized spatial positions."""
    pool = backbone.clip_model.visual.attnpool
    batch, channels, height, width = features.shape
    grid = int(math.sqrt(pool.positional_embedding.shape[0] - 1))
    spatial = pool.positional_embedding[1:].T.reshape(1, channels, grid, grid)
    spatial = F.interpolate(spatial, size=(height, width), mode="bilinear", align_corners=False)
    tokens = features.flatten(2).permute(2, 0, 1)  # [hw, B, C]
    keys = tokens + spatial.flatten(2).permute(2, 0, 1)
    query = tokens.mean(0, keepdim=True) + pool.positional_embedding[:1, None]
    results = []
    for q in range(attn_mask.shape[1]):
        mask = attn_mask[:, q][:, None, None].expand(-1, pool.num_heads, 1, -1).reshape(-1, 1, height * width)
        out, _ = F.multi_head_attention_forward(
            query, keys, keys, channels, pool.num_heads, None,
            torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
            pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=False,
            attn_mask=mask, use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight,
            k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        )
        results.append(out[0])
    return torch.stack(results, dim=1)


def test_binary_masks_restrict_the_attention_pool(backbone):
    torch.manual_seed(1)
    features = torch.randn(2, 256, 3, 5)
    masks = torch.rand(2, 4, 3, 5) > 0.5
    masks[0, 0] = False  # empty: attends to nothing -> the output projection's bias
    masks[1, 1] = True
    with torch.no_grad():
        ours = backbone.embed_masks(features, masks.float())
        expected = _brute_force(backbone, features, (~masks).flatten(2))
    assert_close(ours, expected)
    torch.testing.assert_close(ours[0, 0], backbone.clip_model.visual.attnpool.c_proj.bias)
    # the mask matters: two different masks of one image embed differently
    assert (ours[1, 0] - ours[1, 1]).abs().max() > 1e-2


def test_coverage_weights_scale_the_attention(backbone):
    """Ground-truth masks (segmentation oracle) weight attention to token j by coverage_j."""
    torch.manual_seed(2)
    features = torch.randn(1, 256, 4, 3)
    weights = torch.rand(1, 3, 4, 3) * (torch.rand(1, 3, 4, 3) > 0.3)
    with torch.no_grad():
        ours = backbone.embed_masks(features, weights)
        expected = _brute_force(backbone, features, weights.flatten(2).log())
    assert_close(ours, expected)


def test_dense_features_are_the_value_path(backbone):
    torch.manual_seed(3)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = backbone(images)
        dense = backbone.dense_clip_features(features)
        pool = backbone.clip_model.visual.attnpool
        pixel = features["res5"][0, :, 1, 2]
        expected = pool.c_proj.weight @ (pool.v_proj.weight @ pixel + pool.v_proj.bias) + pool.c_proj.bias
    assert tuple(features["res2"].shape[-2:]) == (16, 24) and tuple(features["res5"].shape[-2:]) == (2, 3)
    assert_close(dense[0, :, 1, 2], expected)


@pytest.mark.parametrize("suffix", sorted(RELEASED))
def test_released_resnet_configs(suffix):
    name, embed_dim, channels = RELEASED[suffix]
    cfg = load_config(f"configs/fcclip/fcclip_convnext_large_eval_ade20k_{suffix}.yaml")
    assert cfg.MODEL.CLIP.MODEL_NAME == f"{name}-quickgelu"  # open_clip's "openai" architecture
    assert cfg.MODEL.FC_CLIP.ENSEMBLE_ON_VALID_MASK is True
    assert (cfg.MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_ALPHA, cfg.MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_BETA) == (0.4, 0.8)
    assert cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 250
    assert cfg.DATASETS.TEST == ("openseg_ade20k_val_panoptic",)
    model_cfg = open_clip.get_model_config(cfg.MODEL.CLIP.MODEL_NAME)
    assert model_cfg["embed_dim"] == embed_dim and model_cfg["quick_gelu"]
    # OpenCLIPResNetBackbone reads each layer's output width: 4 x width x 1, 2, 4, 8
    assert [4 * model_cfg["vision_cfg"]["width"] * 2 ** i for i in range(4)] == channels


def test_builder_picks_the_resnet_backbone(backbone):
    cfg = load_config("configs/fcclip/fcclip_convnext_large_eval_ade20k_r50.yaml")
    cfg.MODEL.CLIP.MODEL_NAME = TINY
    built = build_openclip_backbone(cfg, None)
    assert isinstance(built, OpenCLIPResNetBackbone)
    width = open_clip.get_model_config(TINY)["vision_cfg"]["width"]
    assert {k: s.channels for k, s in built.output_shape().items()} == {
        "res2": 4 * width, "res3": 8 * width, "res4": 16 * width, "res5": 32 * width,
    }
    assert {k: s.stride for k, s in built.output_shape().items()} == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
