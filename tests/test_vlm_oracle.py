"""Table 1 protocol (openseg.modeling.vlm_oracle): SigLIP-style dense features and local
tokenizers on a tiny random model built here, mask pooling by hand, missing weights, and the
zero-shot ground-truth-mask evaluation end to end on the demo data."""
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog

from openseg.config import load_config
from openseg.data.datasets.common import register_subset
from openseg.evaluation.builder import ensure_class_splits
from openseg.modeling import vlm_oracle
from openseg.modeling.backbones.clip import OpenCLIPTimmViTBackbone, load_tokenizer

from siglip_test_model import SIGLIP, write_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tokenizer(str(tmp_path_factory.mktemp("siglip_tokenizer")))


@pytest.fixture(scope="module")
def siglip(tokenizer_dir):
    torch.manual_seed(0)
    backbone = OpenCLIPTimmViTBackbone(SIGLIP, "", True, ["res4"], tokenizer_dir).eval()
    with torch.no_grad():  # move the head off its init so every term matters
        for param in backbone.clip_model.visual.trunk.attn_pool.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return backbone


def test_siglip_dense_features_are_the_pooling_head_on_each_single_token(siglip):
    """MaskCLIP on an attention-pooling head: for a one-token sequence the softmax weight is
    1, so timm's own head on that token alone is the reference."""
    trunk = siglip.clip_model.visual.trunk
    images = torch.randn(1, 3, 48, 80)  # non-square, not the 64 x 64 training size
    with torch.no_grad():
        dense = siglip.dense_clip_features(siglip(images))
        tokens, grid = siglip.trunk_tokens(images)
        reference = torch.stack([
            siglip.clip_model.visual.head(trunk.forward_head(tokens[:, i : i + 1]))[0]
            for i in range(tokens.shape[1])
        ])
    assert grid == (3, 5) and dense.shape == (1, 64, 3, 5)
    torch.testing.assert_close(dense[0].flatten(1).T, reference, rtol=1e-5, atol=1e-5)


def test_siglip_tokens_match_timm_at_native_size_and_resample_positions_otherwise(siglip):
    trunk = siglip.clip_model.visual.trunk
    native = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, _ = siglip.trunk_tokens(native)
        torch.testing.assert_close(tokens, trunk.forward_features(native))
        # at another size the position grid is resized bicubically from the 4 x 4 one
        tokens_big, grid = siglip.trunk_tokens(torch.randn(1, 3, 96, 64))
    assert grid == (6, 4) and tokens_big.shape == (1, 24, 64)


def test_hugging_face_tokenizers_come_from_a_local_folder_only(tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        load_tokenizer(SIGLIP, "")
    with pytest.raises(FileNotFoundError, match="no-such-hub-repo"):
        load_tokenizer(SIGLIP, os.path.join(tokenizer_dir, "missing"))
    tokens = load_tokenizer(SIGLIP, tokenizer_dir)(["a photo of the sky"])
    assert tokens.shape == (1, 16) and tokens[0, :5].tolist() == [3, 4, 5, 6, 11]


def test_every_paper_model_builds_its_tokenizer_offline_or_names_the_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert len(vlm_oracle.VLM_MODELS) == 12
    for spec in vlm_oracle.VLM_MODELS.values():
        if spec.hf_tokenizer:
            with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
                load_tokenizer(spec.model_name, "")
        else:
            assert load_tokenizer(spec.model_name)(["sky"]).shape[-1] == 77


def test_missing_weights_name_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=os.path.join(str(tmp_path), "siglip2-vit-b-16-256", "open_clip_pytorch_model.bin")):
        vlm_oracle.vlm_files("siglip2-vit-b-16-256", str(tmp_path))
    with pytest.raises(ValueError, match="Unknown VLM"):
        vlm_oracle.vlm_files("ViT-B-16", str(tmp_path))


def test_mask_pooling_is_the_coverage_weighted_mean():
    dense = torch.arange(2 * 2 * 2, dtype=torch.float32).view(2, 2, 2)
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # all of cell (0, 0)
    masks[0, 2, 2] = True  # a quarter of cell (1, 1)
    expected = (1.0 * dense[:, 0, 0] + 0.25 * dense[:, 1, 1]) / 1.25
    torch.testing.assert_close(vlm_oracle.pool_masks(dense, masks)[0], expected)


def test_table1_settings_are_the_papers_resolutions():
    from detectron2.data import transforms as T

    for setting, (short, long) in [("512", (384, 512)), ("640", (480, 640)), ("800x1333", (800, 1067))]:
        min_size, max_size = vlm_oracle.TABLE1_SETTINGS[setting]
        resize = T.ResizeShortestEdge(min_size, max_size).get_transform(torch.zeros(480, 640, 3).numpy())
        assert (resize.new_h, resize.new_w) == (short, long)


def test_zero_shot_ground_truth_evaluation_on_demo_data(tmp_path, monkeypatch):
    """A random tiny CLIP under the segmentation oracle: one predicted segment per ground-truth
    segment (stuff of one class merged), finite PQ with seen / unseen columns."""
    key = "tiny"
    monkeypatch.setitem(vlm_oracle.VLM_MODELS, key, vlm_oracle.VLMSpec(
        "test", "ConvNeXt-atto", "none", "openseg-test-convnext", "local"))
    monkeypatch.setitem(vlm_oracle.TABLE1_SETTINGS, "64", (64, 64))
    import open_clip

    open_clip.add_model_config(os.path.join(ROOT, "tests", "data", "open_clip"))
    torch.manual_seed(0)
    model = open_clip.create_model("openseg-test-convnext", pretrained=None)
    os.makedirs(tmp_path / key)
    torch.save(model.state_dict(), tmp_path / key / "open_clip_pytorch_model.bin")
    dataset = register_subset("openseg_demo_val", 4)
    cfg = load_config(os.path.join(ROOT, "configs", "demo", "fcclip_tiny_convnext.yaml"),
                      ["DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", f"('{dataset}',)"])
    ensure_class_splits(cfg, dataset)
    summary = vlm_oracle.evaluate_vlm(cfg, key, str(tmp_path), "64", str(tmp_path / "eval"))
    for column in ("PQ", "PQ_seen", "PQ_unseen"):
        assert 0.0 <= summary[column] <= 100.0
    assert summary["PQ"] < 100.0  # random CLIP: not every class right
    assert len(DatasetCatalog.get(dataset)) == 4
