"""FC-CLIP on a tiny random-init ConvNeXt CLIP: pooling, ensemble, classifiers, vocabularies."""

import os

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from openseg.config import load_config
from openseg.data.mappers import build_mapper
from openseg.data.vocab import register_vocabulary
from openseg.projects.fcclip import FCCLIP, InVocabularyClassifier, geometric_ensemble, mask_pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo", "fcclip_tiny_convnext.yaml")
SMALL = ["DATALOADER.NUM_WORKERS", "0", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "4",
         "MODEL.MASK_FORMER.DEC_LAYERS", "2"]


def demo_cfg(*opts):
    return load_config(DEMO_CONFIG, SMALL + list(opts))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(demo_cfg()).eval()


def test_mask_pool_hand_computed():
    # channel 0 = [[1, 2], [3, 4]], channel 1 = [[10, 20], [30, 40]]
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])
    weights = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.0, 0.0]]]])
    pooled = mask_pool(features, weights)
    # mask 0 covers 1, 3, 4 -> (1+3+4)/3 and (10+30+40)/3; mask 1 is empty; mask 2 = mean(1, 2)
    expected = torch.tensor([[[8 / 3, 80 / 3], [0.0, 0.0], [1.5, 15.0]]])
    torch.testing.assert_close(pooled, expected)


def test_geometric_ensemble_matches_the_paper_equation():
    torch.manual_seed(0)
    in_logits, out_logits = torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    seen = torch.tensor([True, False, True])
    alpha, beta = 0.4, 0.8
    result = geometric_ensemble(in_logits, out_logits, seen, alpha, beta).exp().numpy()
    for b in range(2):
        for q in range(5):
            z = np.exp(in_logits[b, q].double().numpy())
            p_in_all = z / z.sum()
            p_in = np.exp(in_logits[b, q, :3].double().numpy())
            p_in /= p_in.sum()
            p_out = np.exp(out_logits[b, q].double().numpy())
            p_out /= p_out.sum()
            # Eq. (FC-CLIP Sec. 3.3): p_in^(1-alpha) p_out^alpha if seen, beta otherwise
            c = np.array([
                p_in[j] ** (1 - (alpha if seen[j] else beta)) * p_out[j] ** (alpha if seen[j] else beta)
                for j in range(3)
            ])
            c /= c.sum()
            void = p_in_all[-1]
            np.testing.assert_allclose(result[b, q, :3], c * (1 - void), atol=1e-6)
            np.testing.assert_allclose(result[b, q, 3], void, atol=1e-6)


def test_in_vocabulary_classifier_is_scaled_cosine_to_text_and_void():
    torch.manual_seed(0)
    classifier = InVocabularyClassifier(hidden_dim=8, embed_dim=6, logit_scale_init=np.log(10.0))
    text = F.normalize(torch.randn(3, 6), dim=-1)
    classifier.use_vocabulary(text)
    embeds = torch.randn(2, 4, 8)
    logits = classifier(embeds)
    projected = classifier.projection(embeds).detach().numpy()
    void = classifier.void_embedding.weight.detach().numpy()[0]
    for b in range(2):
        for q in range(4):
            v = projected[b, q] / np.linalg.norm(projected[b, q])
            targets = list(text.numpy()) + [void / np.linalg.norm(void)]
            expected = [10.0 * float(v @ t) for t in targets]
            np.testing.assert_allclose(logits[b, q].detach().numpy(), expected, atol=1e-4)


def reference_class_embedding(model, names):
    """Mean of the normalised embeddings of every name (the demo config's only template is
    "{}"), renormalised."""
    tokenizer = open_clip.get_tokenizer(model.backbone.model_name)
    texts = list(names)
    with torch.no_grad():
        embeds = model.backbone.clip_model.encode_text(tokenizer(texts), normalize=True)
    mean = embeds.mean(0)
    return mean / mean.norm()


def test_vocabularies_and_seen_classes_follow_the_config(model):
    assert isinstance(model, FCCLIP)
    assert model.train_text_embeddings.shape == (8, 64)
    torch.testing.assert_close(
        model.test_text_embeddings[3], reference_class_embedding(model, ["cross", "plus sign"]),
        atol=1e-5, rtol=1e-5,
    )
    # the demo config takes seen classes from the test split: cross (3) and sand (7) unseen
    assert model.seen_classes.tolist() == [True, True, True, False, True, True, True, False]

    name = register_vocabulary("openseg_test_fcclip_vocab", [["circle"], ["hexagon"]], [["sky", "air"]])
    torch.manual_seed(0)
    # the demo config's "test_class_splits" falls back to name overlap: no class_splits here
    custom = build_model(demo_cfg("DATASETS.TEST", f"('{name}',)")).eval()
    assert custom.test_text_embeddings.shape == (3, 64)
    assert custom.seen_classes.tolist() == [True, False, True]  # by class-name overlap
    torch.testing.assert_close(
        custom.test_text_embeddings[2], reference_class_embedding(custom, ["sky", "air"]),
        atol=1e-5, rtol=1e-5,
    )
    record = DatasetCatalog.get("openseg_demo_val")[0]
    with torch.no_grad():
        output = custom([build_mapper(demo_cfg(), is_train=False)(record)])[0]
    assert output["sem_seg"].shape == (3, 128, 128)
    assert all(s["category_id"] < 3 for s in output["panoptic_seg"][1])


def test_out_of_vocabulary_logits_equal_brute_force_mask_pooling(model):
    torch.manual_seed(1)
    dense = torch.randn(1, 64, 4, 4)
    mask_logits = torch.randn(1, 2, 16, 16)
    logits = model.out_of_vocabulary_logits(dense, mask_logits)
    resized = F.interpolate(mask_logits, size=(4, 4), mode="bilinear", align_corners=False)
    scale = float(model.backbone.clip_model.logit_scale.exp())
    for q in range(2):
        cells = [dense[0, :, i, j] for i in range(4) for j in range(4) if resized[0, q, i, j] > 0]
        pooled = torch.stack(cells).mean(0)
        expected = scale * (pooled / pooled.norm()) @ model.test_text_embeddings.T
        torch.testing.assert_close(logits[0, q], expected, atol=1e-4, rtol=1e-4)


def test_segmentation_oracle_classifies_a_mask_by_its_clip_features(model):
    dense = torch.randn(1, 64, 4, 4)
    masks = torch.zeros(1, 128, 128, dtype=torch.bool)
    masks[0, 32:64, 64:96] = True  # exactly the dense cell (1, 2) at stride 32
    logits = model.classify_masks(
        {"clip_dense_features": dense}, 0, masks, torch.zeros(4, 9), torch.zeros(4, 128, 128),
        (128, 128),
    )
    cell = dense[0, :, 1, 2]
    expected = float(model.backbone.clip_model.logit_scale.exp()) * (cell / cell.norm()) @ model.test_text_embeddings.T
    torch.testing.assert_close(logits[0, :8], expected.log_softmax(-1), atol=1e-4, rtol=1e-4)
    assert logits[0, 8] < -1000  # ground-truth masks are never "no object"


def test_text_embeddings_follow_loaded_clip_weights(model, tmp_path):
    """A random-init CLIP is replaced by the checkpoint's: embeddings must be recomputed."""
    torch.manual_seed(123)
    other = build_model(demo_cfg()).eval()
    assert not torch.allclose(other.test_text_embeddings, model.test_text_embeddings)
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other.test_text_embeddings, model.test_text_embeddings)
    torch.testing.assert_close(other.train_text_embeddings, model.train_text_embeddings)


def test_training_step_trains_heads_not_clip():
    torch.manual_seed(0)
    cfg = demo_cfg()
    model = build_model(cfg).train()
    mapper = build_mapper(cfg, is_train=True)
    batch = [mapper(r) for r in DatasetCatalog.get("openseg_demo_train")[:2]]
    losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.classifier.void_embedding.weight.grad is not None
    assert model.classifier.logit_scale.grad is not None
    assert all(p.grad is None for p in model.backbone.clip_model.parameters())


def test_bad_input_names_the_offender():
    with pytest.raises(ValueError, match="no-such-clip"):
        build_model(demo_cfg("MODEL.CLIP.MODEL_NAME", "no-such-clip"))
    with pytest.raises(FileNotFoundError, match="missing_clip.pt"):
        build_model(demo_cfg("MODEL.CLIP.PRETRAINED_PATH", "/nonexistent/missing_clip.pt"))
    name = "openseg_test_fcclip_bad_vocab"
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(
        stuff_classes=["sky", "grass", "Sky"], synonyms=[["sky"], ["grass"], ["Sky"]],
        thing_dataset_id_to_contiguous_id={},
    )
    with pytest.raises(ValueError, match="entry 2 .*'Sky'"):
        build_model(demo_cfg("DATASETS.TEST", f"('{name}',)"))
    MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(
        stuff_classes=["sky", "grass", "water"], synonyms=[["sky"], ["grass"], ["water", ""]],
        thing_dataset_id_to_contiguous_id={},
    )
    with pytest.raises(ValueError, match="entry 2"):
        build_model(demo_cfg("DATASETS.TEST", f"('{name}',)"))
    MetadataCatalog.remove(name)
    with pytest.raises(ValueError, match="SEEN_CLASSES='by_magic'"):
        FCCLIP.seen_test_classes("by_magic", [["a"]], [["a"]], "openseg_demo_val")
    with pytest.raises(ValueError, match="OPEN_VOCABULARY"):
        build_model(demo_cfg("MODEL.OPEN_VOCABULARY", "False"))
