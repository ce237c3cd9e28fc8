"""openseg's `FCCLIP` with a ResNet CLIP computes what the released FC-CLIP computes.

The fixtures (`tests/fixtures/reference/fcclip_rn/fixtures.pt`) were produced by
`tools/make_reference_fixtures.py --reference-root ../shared/reference --only fcclip_rn` from
the release's own `FCCLIP` with its ResNet-CLIP config (ENSEMBLE_ON_VALID_MASK True) and a
tiny random open_clip ModifiedResNet (see `tools/reference_fixtures/fcclip_rn.py`). The
weights go through the "fcclip" checkpoint format into an openseg model built from
`configs/fcclip/fcclip_convnext_large_eval_ade20k_r50.yaml` with the fixture's sizes, and
within 1e-5 of their magnitude:

* the last decoder prediction (res2-res5 of the ResNet feed the pixel decoder);
* out-of-vocabulary logits (the attention pool restricted to each mask) and the ensembled
  log-probabilities; the attention pool on hand-made (empty, full, one-cell) masks;
* semantic scores, panoptic segments and instance masks / classes / scores.
"""

import pytest
import torch
import yaml
from detectron2.modeling import build_model
from reference_utils import (  # noqa: F401  (one_thread is an autouse fixture)
    assert_decisions_match,
    assert_postprocessing_matches,
    detectron2_inputs,
    load_reference,
    one_thread,
    postprocess_release_outputs,
)
from test_reference_fcclip import (
    TRAIN_NAME,
    TEST_NAME,
    _copy,
    _register,
    assert_close,
    released_state,
)

from openseg.checkpoint import OpenSegCheckpointer, detect_format
from openseg.config import load_config
from openseg.modeling.backbones import OpenCLIPBackbone, OpenCLIPResNetBackbone
from openseg.projects.fcclip import geometric_ensemble
from openseg.projects.fcclip.checkpoint import released_to_openseg
from openseg.projects.fcclip.meta_arch import CLIP_POOLING_FEATURES

OPEN_CLIP_NAME = "openseg-fcclip-tiny-rn"
CONFIG = "configs/fcclip/fcclip_convnext_large_eval_ade20k_r50.yaml"


@pytest.fixture(scope="module")
def reference():
    return load_reference("fcclip_rn")


def openseg_cfg(reference):
    import open_clip

    released = yaml.safe_load(reference["reference_config_yaml"])
    assert open_clip.get_model_config(OPEN_CLIP_NAME) == reference["open_clip_config"]
    _register(TRAIN_NAME, reference["train_classes"], reference["train_things"])
    _register(TEST_NAME, reference["test_classes"], reference["test_things"])
    cfg = load_config(CONFIG)
    assert cfg.MODEL.FC_CLIP.ENSEMBLE_ON_VALID_MASK == released["MODEL"]["FC_CLIP"]["ENSEMBLE_ON_VALID_MASK"]
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PIXEL_MEAN = released["MODEL"]["PIXEL_MEAN"]
    cfg.MODEL.PIXEL_STD = released["MODEL"]["PIXEL_STD"]
    for group in ("SEM_SEG_HEAD", "MASK_FORMER"):
        _copy(cfg.MODEL[group], released["MODEL"][group])
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = released["MODEL"]["MASK_FORMER"]["NHEADS"]
    cfg.MODEL.CLIP.MODEL_NAME = OPEN_CLIP_NAME
    cfg.MODEL.CLIP.PRETRAINED_PATH = ""
    cfg.MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_ALPHA = reference["alpha"]
    cfg.MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_BETA = reference["beta"]
    cfg.MODEL.TEXT_EMBEDDING.CACHE_DIR = ""
    detections = released["TEST"]["DETECTIONS_PER_IMAGE"]
    cfg.TEST.DETECTIONS_PER_IMAGE = detections
    if "DETECTIONS_PER_IMAGE" in cfg.MODEL.MASK_FORMER.TEST:
        cfg.MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE = detections
    cfg.DATASETS.TRAIN = (TRAIN_NAME,)
    cfg.DATASETS.TEST = (TEST_NAME,)
    return cfg


@pytest.fixture(scope="module")
def model(reference):
    model = build_model(openseg_cfg(reference))
    model.load_state_dict(released_to_openseg(released_state(reference)), strict=True)
    return model.eval()


def _heads(model, reference):
    with torch.no_grad():
        images = model.preprocess_images(detectron2_inputs(reference))
        return model.forward_heads(model.backbone(images.tensor))


def test_released_resnet_checkpoint_loads_through_the_fcclip_format(reference, tmp_path):
    released = released_state(reference)
    assert detect_format(list(released)).name == "fcclip"
    path = tmp_path / "fcclip_rn_release.pth"
    torch.save({"model": released}, path)
    model = build_model(openseg_cfg(reference))
    assert isinstance(model.backbone, OpenCLIPResNetBackbone)
    OpenSegCheckpointer(model).load(str(path))
    ours = released_to_openseg(released)
    state = model.state_dict()
    missing = [k for k in ours if k not in state]
    assert not missing, missing
    for key, value in ours.items():
        if not key.startswith("criterion."):  # derived from the config
            assert torch.equal(state[key], value), key


def test_last_decoder_prediction_matches(model, reference):
    outputs = _heads(model, reference)
    for key in ("pred_logits", "pred_masks"):
        assert_close(outputs[key], reference["last_layer"][key], f"last prediction {key}")


def test_out_of_vocabulary_and_ensembled_logits_match(model, reference):
    outputs = _heads(model, reference)
    features = outputs[CLIP_POOLING_FEATURES]
    assert tuple(features.shape[-2:]) == tuple(reference["clip_size"])
    out_vocab = model.out_of_vocabulary_logits(features, outputs["pred_masks"])
    # the release's out-of-vocabulary logits carry the void column last; the ensemble drops it
    assert_close(out_vocab, reference["out_vocab_logits"][..., :-1], "out-of-vocabulary logits")
    resized = torch.nn.functional.interpolate(
        outputs["pred_masks"], size=features.shape[-2:], mode="bilinear", align_corners=False
    )
    valid = (resized > 0).flatten(2).any(-1)
    ensembled = geometric_ensemble(
        outputs["pred_logits"], out_vocab, model.seen_classes, model.ensemble_alpha,
        model.ensemble_beta, valid,
    )
    for b, expected in enumerate(reference["ensembled"]):
        assert_close(ensembled[b], expected, f"image {b} ensembled log-probabilities")
    # a ConvNeXt-style classifier (mean inside the mask, then the pool's value path) is far off
    masks = (resized > 0).float()
    averaged = model.embedding_logits(OpenCLIPBackbone.embed_masks(model.backbone, features, masks))
    assert (averaged - reference["out_vocab_logits"][..., :-1]).abs().max() > 1e-2
    # and so is the pool with its query and keys but without the mask
    unmasked = model.embedding_logits(model.backbone.embed_masks(features, torch.ones_like(masks)))
    assert (unmasked - reference["out_vocab_logits"][..., :-1]).abs().max() > 1e-2


def test_attention_pool_on_empty_full_and_single_cell_masks_matches(model, reference):
    """The release's `visual_prediction_forward` on hand-made masks (an empty one included)."""
    features = _heads(model, reference)[CLIP_POOLING_FEATURES]
    masks = reference["pool_masks"]
    assert not masks[0, 0].any() and masks[0, 1].all() and int(masks[1, 0].sum()) == 1
    with torch.no_grad():
        embedded = model.backbone.embed_masks(features, masks)
    assert_close(embedded, reference["pool_embeddings"], "attention-pool embeddings")


def test_postprocessing_matches(model, reference):
    """Post-processing of the release's own ensembled logits and masks within 1e-5; end to end,
    the same decisions."""
    ensembled = torch.stack(reference["ensembled"])
    results = postprocess_release_outputs(model, reference, ensembled, reference["last_layer"]["pred_masks"])
    assert_postprocessing_matches(results, reference, close=assert_close)
    with torch.no_grad():
        assert_decisions_match(model(detectron2_inputs(reference)), reference)
