"""FC-CLIP on a tiny random-init ConvNeXt CLIP: pooling, ensemble, classifiers, vocabularies
(hand-computed cases; `tests/test_reference_fcclip.py` compares with the release)."""

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
from openseg.data.splits import exact_synonym_split
from openseg.data.vocab import FCCLIP_PROMPT_TEMPLATES, read_vocabulary_file, release_vocabulary
from openseg.modeling.mask_pooling import mask_pool, weighted_mask_pool
from openseg.projects.fcclip import FCCLIP, InVocabularyClassifier, geometric_ensemble
from openseg.projects.fcclip.meta_arch import CLIP_POOLING_FEATURES

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
    pooled = weighted_mask_pool(features, weights)
    # mask 0 covers 1, 3, 4 -> (1+3+4)/3 and (10+30+40)/3; mask 1 is empty; mask 2 = mean(1, 2)
    expected = torch.tensor([[[8 / 3, 80 / 3], [0.0, 0.0], [1.5, 15.0]]])
    torch.testing.assert_close(pooled, expected)
    # FC-CLIP's pooling binarises logits (> 0): -0.1 and 0 are outside, any positive is inside
    logits = torch.tensor([[[[5.0, -0.1], [0.0, 1e-3]]]])
    torch.testing.assert_close(mask_pool(features, logits), torch.tensor([[[2.5, 25.0]]]))


def test_mask_pool_resizes_logits_bilinearly_to_the_feature_grid():
    features = torch.arange(4.0).view(1, 1, 2, 2)
    # a 4 x 4 logit map whose bilinear (half-pixel) downsampling is positive only at (0, 0)
    logits = torch.full((1, 1, 4, 4), -1.0)
    logits[0, 0, :2, :2] = 3.0
    resized = F.interpolate(logits, size=(2, 2), mode="bilinear", align_corners=False)
    assert (resized > 0).sum() == 1
    torch.testing.assert_close(mask_pool(features, logits), torch.tensor([[[0.0]]]))


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


def test_geometric_ensemble_alpha_weights_seen_and_beta_unseen_classes():
    """One query, p_in uniform over 2 classes, p_out = (0.9, 0.1): with alpha 0 a seen class keeps
    p_in; with beta 1 an unseen class takes p_out. Swapping alpha and beta changes the result."""
    in_logits = torch.tensor([[0.0, 0.0, -50.0]])  # void ~ 0
    out_logits = torch.tensor([[np.log(0.9), np.log(0.1)]])
    seen = torch.tensor([True, False])
    probs = geometric_ensemble(in_logits, out_logits, seen, alpha=0.0, beta=1.0).exp()[0, :2]
    # unnormalised: class 0 = 0.5^1 * 0.9^0 = 0.5, class 1 = 0.5^0 * 0.1^1 = 0.1
    torch.testing.assert_close(probs, torch.tensor([0.5 / 0.6, 0.1 / 0.6]), atol=1e-6, rtol=1e-6)
    swapped = geometric_ensemble(in_logits, out_logits, seen, alpha=1.0, beta=0.0).exp()[0, :2]
    torch.testing.assert_close(swapped, torch.tensor([0.9 / 1.4, 0.5 / 1.4]), atol=1e-6, rtol=1e-6)
    # ENSEMBLE_ON_VALID_MASK: an invalid query keeps the in-vocabulary probabilities
    kept = geometric_ensemble(in_logits, out_logits, seen, 0.0, 1.0, valid=torch.tensor([False]))
    torch.testing.assert_close(kept.exp()[0, :2], torch.tensor([0.5, 0.5]), atol=1e-6, rtol=1e-6)


def test_in_vocabulary_classifier_by_hand():
    """query + LN/Linear(mask-pooled features) -> MLP -> scaled cosine to each synonym and the
    void embedding, max over a class's synonyms (FC-CLIP's release)."""
    torch.manual_seed(0)
    classifier = InVocabularyClassifier(hidden_dim=8, embed_dim=6, logit_scale_init=np.log(10.0))
    text = F.normalize(torch.randn(5, 6), dim=-1)
    classifier.use_vocabulary(text, [2, 1, 2])  # classes own synonyms {0, 1}, {2}, {3, 4}
    embeds = torch.randn(2, 4, 8)
    mask_features = torch.randn(2, 8, 3, 5)
    masks = torch.randn(2, 4, 3, 5)
    logits = classifier(embeds, masks, mask_features)
    assert logits.shape == (2, 4, 4)
    void = classifier.void_embedding.weight.detach()[0]
    for b in range(2):
        for q in range(4):
            inside = masks[b, q] > 0
            pooled = mask_features[b][:, inside].mean(-1)
            x = classifier.projection(classifier.pooling_projection(pooled) + embeds[b, q]).detach()
            v = x / x.norm()
            sims = [10.0 * float(v @ t) for t in text] + [10.0 * float(v @ (void / void.norm()))]
            expected = [max(sims[0:2]), sims[2], max(sims[3:5]), sims[5]]
            np.testing.assert_allclose(logits[b, q].detach().numpy(), expected, atol=1e-4)


def reference_name_embedding(model, name, templates):
    """Mean of the normalised embeddings of `name` in every template, renormalised."""
    tokenizer = open_clip.get_tokenizer(model.backbone.model_name)
    with torch.no_grad():
        embeds = model.backbone.clip_model.encode_text(
            tokenizer([t.format(name) for t in templates]), normalize=True
        )
    mean = embeds.mean(0)
    return mean / mean.norm()


def test_vocabularies_and_seen_classes_follow_the_config(model):
    assert isinstance(model, FCCLIP)
    # one embedding per synonym: 3 + 3 + 2 + 2 + 2 + 3 + 3 + 3 demo names
    assert model.train_text_embeddings.shape == (21, 64)
    # "cross" is class 3's first synonym, after 3 + 3 + 2 names
    torch.testing.assert_close(
        model.test_text_embeddings[8], reference_name_embedding(model, "cross", ["{}"]),
        atol=1e-5, rtol=1e-5,
    )
    torch.testing.assert_close(
        model.test_text_embeddings[9], reference_name_embedding(model, "plus sign", ["{}"]),
        atol=1e-5, rtol=1e-5,
    )
    # the demo config takes seen classes from the test split: cross (3) and sand (7) unseen
    assert model.seen_classes.tolist() == [True, True, True, False, True, True, True, False]

    name = register_vocabulary(
        "openseg_test_fcclip_vocab", [["circle"], ["circles"]], [["heaven", "sky"]]
    )
    torch.manual_seed(0)
    # the demo config's "test_class_splits" falls back to FC-CLIP's rule: no class_splits here
    custom = build_model(demo_cfg("DATASETS.TEST", f"('{name}',)")).eval()
    assert custom.test_text_embeddings.shape == (4, 64)
    # exact synonyms only: "circles" is not "circle" (openseg's plural-aware rule would say seen)
    assert custom.seen_classes.tolist() == [True, False, True]
    assert MetadataCatalog.get(name).class_splits == {"seen": [0, 2], "unseen": [1]}
    record = DatasetCatalog.get("openseg_demo_val")[0]
    with torch.no_grad():
        output = custom([build_mapper(demo_cfg(), is_train=False)(record)])[0]
    assert output["sem_seg"].shape == (3, 128, 128)
    assert all(s["category_id"] < 3 for s in output["panoptic_seg"][1])


def test_release_templates_are_the_default():
    """Without TEXT_EMBEDDING.PROMPT_TEMPLATES, FC-CLIP embeds with the release's 14 ViLD
    templates (four of them without a full stop)."""
    torch.manual_seed(0)
    model = build_model(demo_cfg("MODEL.TEXT_EMBEDDING.PROMPT_TEMPLATES", "[]")).eval()
    assert model.prompt_templates == FCCLIP_PROMPT_TEMPLATES
    assert len(FCCLIP_PROMPT_TEMPLATES) == 14
    assert sum(not t.endswith(".") for t in FCCLIP_PROMPT_TEMPLATES) == 4
    torch.testing.assert_close(
        model.test_text_embeddings[0], reference_name_embedding(model, "circle", FCCLIP_PROMPT_TEMPLATES),
        atol=1e-5, rtol=1e-5,
    )


def test_release_vocabularies_and_the_64_seen_ade20k_classes():
    """FC-CLIP's synonym files: COCO panoptic 133 classes, ADE20K-150; the release's exact
    synonym rule makes 64 ADE20K-150 classes seen from COCO (openseg's plural-aware rule: more)."""
    coco = release_vocabulary("fcclip", "openseg_coco_2017_train_panoptic")
    ade = release_vocabulary("fcclip", "openseg_ade20k_val_panoptic")
    assert len(coco) == 133 and len(ade) == 150
    assert ade[0][:2] == ["wall", "walls"]
    split = exact_synonym_split(coco, ade)
    assert len(split["seen"]) == 64 and len(split["unseen"]) == 86
    voc20 = release_vocabulary("fcclip", "openseg_pascal_voc20_sem_seg_val")
    assert len(voc20) == 20 and voc20[0][0] == "aeroplane"  # VOC-21 without background
    assert release_vocabulary("fcclip", "openseg_demo_val") is None
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_vocabulary_file("/nonexistent/nope.txt")


def test_out_of_vocabulary_logits_equal_brute_force_mask_pooling(model):
    """Pool res5 (after norm_pre) inside the binarised resized mask, then the CLIP head, then
    scaled cosine to every synonym, max per class."""
    torch.manual_seed(1)
    channels = model.backbone.output_shape()["res5"].channels
    features = torch.randn(1, channels, 4, 4)
    mask_logits = torch.randn(1, 2, 16, 16)
    logits = model.out_of_vocabulary_logits(features, mask_logits)
    resized = F.interpolate(mask_logits, size=(4, 4), mode="bilinear", align_corners=False)
    scale = float(model.backbone.clip_model.logit_scale.exp())
    visual = model.backbone.clip_model.visual
    counts = [len(names) for names in model.test_vocabulary]
    for q in range(2):
        cells = [features[0, :, i, j] for i in range(4) for j in range(4) if resized[0, q, i, j] > 0]
        pooled = torch.stack(cells).mean(0)
        with torch.no_grad():
            embedded = visual.head(visual.trunk.head(pooled.view(1, -1, 1, 1)))[0]
        sims = scale * (embedded / embedded.norm()) @ model.test_text_embeddings.T
        expected = torch.stack([group.max() for group in torch.split(sims, counts)])
        torch.testing.assert_close(logits[0, q], expected, atol=1e-4, rtol=1e-4)


def test_segmentation_oracle_classifies_a_mask_by_its_clip_features(model):
    channels = model.backbone.output_shape()["res5"].channels
    features = torch.randn(1, channels, 4, 4)
    masks = torch.zeros(1, 128, 128, dtype=torch.bool)
    masks[0, 32:64, 64:96] = True  # exactly the feature cell (1, 2) at stride 32
    logits = model.classify_masks(
        {CLIP_POOLING_FEATURES: features}, 0, masks, torch.zeros(4, 9), torch.zeros(4, 128, 128),
        (128, 128),
    )
    expected = model.clip_logits(features[0, :, 1, 2][None])[0]
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
    assert model.classifier.pooling_projection[1].weight.grad is not None
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
