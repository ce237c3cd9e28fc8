"""openseg's `FCCLIP` computes what the released FC-CLIP (bytedance/fc-clip) computes.

The fixtures (`tests/fixtures/reference/fcclip/fixtures.pt`) were produced by
`tools/make_reference_fixtures.py --reference-root ../shared/reference --only fcclip` from
the release's own `FCCLIP` with a tiny random open_clip ConvNeXt and random weights (see
`tools/reference_fixtures/fcclip.py`: sizes, vocabularies with synonyms and seen / unseen
test classes, alpha 0.25 / beta 0.75, boundary checks). The weights go through the "fcclip"
checkpoint format into an openseg model built from the same configuration values, and
within 1e-5 of their magnitude:

* in-vocabulary logits (synonym max, void) and masks of every decoder prediction;
* out-of-vocabulary logits (mask pooling before the CLIP head) and the ensembled
  log-probabilities (seen classes by the release's rule, alpha for seen, beta for unseen);
* semantic scores, panoptic segments and instance masks / classes / scores;
* a training step from the same criterion seed: point draws, every loss and gradient.
"""

import pytest
import torch
import yaml
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

import reference_utils
from reference_utils import (  # noqa: F401  (one_thread is an autouse fixture)
    assert_decisions_match,
    assert_postprocessing_matches,
    detectron2_inputs,
    load_reference,
    one_thread,
    postprocess_release_outputs,
    record_criterion_rand,
)

from openseg.checkpoint import OpenSegCheckpointer, detect_format, read_checkpoint_file
from openseg.config import load_config
from openseg.data.splits import seen_unseen_split
from openseg.projects.fcclip import geometric_ensemble
from openseg.projects.fcclip.checkpoint import openseg_to_released, released_to_openseg
from openseg.projects.fcclip.meta_arch import CLIP_POOLING_FEATURES
from script_utils import load_script

TRAIN_NAME, TEST_NAME = "openseg_reference_fcclip_train", "openseg_reference_fcclip_test"
TOKEN_TABLE = "backbone.clip_model.token_embedding.weight"
OPEN_CLIP_NAME = "openseg-fcclip-tiny-convnext"


@pytest.fixture(scope="module")
def reference():
    return load_reference("fcclip")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """`reference_utils.assert_close` in float32."""
    reference_utils.assert_close(actual.float(), expected.float(), what)


def released_state(reference):
    """The release's float32 state dict (stored as float16 values, token table compacted)."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in reference["state_dict"].items()}
    table = torch.zeros(reference["token_table_shape"])
    table[reference["token_rows"]] = state[TOKEN_TABLE]
    state[TOKEN_TABLE] = table
    return state


def _register(name, classes, things):
    synonyms = [entry.split(",") for entry in classes]
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(
        stuff_classes=[s[0] for s in synonyms],
        thing_classes=[s[0] for s in synonyms[:things]],
        synonyms=synonyms,
        thing_dataset_id_to_contiguous_id={i: i for i in range(things)},
        stuff_dataset_id_to_contiguous_id={i: i for i in range(len(classes))},
        ignore_label=255,
        label_divisor=1000,
    )


def _copy(node, values):
    for key, value in values.items():
        if key not in node or key == "NAME":
            continue
        if isinstance(value, dict):
            _copy(node[key], value)
        else:
            node[key] = tuple(value) if isinstance(node[key], tuple) else value


def openseg_cfg(reference, alpha=None, beta=None):
    import open_clip

    released = yaml.safe_load(reference["reference_config_yaml"])
    assert open_clip.get_model_config(OPEN_CLIP_NAME) == reference["open_clip_config"]
    _register(TRAIN_NAME, reference["train_classes"], reference["train_things"])
    _register(TEST_NAME, reference["test_classes"], reference["test_things"])
    cfg = load_config("configs/fcclip/Base-FCCLIP.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PIXEL_MEAN = released["MODEL"]["PIXEL_MEAN"]
    cfg.MODEL.PIXEL_STD = released["MODEL"]["PIXEL_STD"]
    for group in ("SEM_SEG_HEAD", "MASK_FORMER"):
        _copy(cfg.MODEL[group], released["MODEL"][group])
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = released["MODEL"]["MASK_FORMER"]["NHEADS"]
    cfg.MODEL.CLIP.MODEL_NAME = OPEN_CLIP_NAME
    cfg.MODEL.CLIP.PRETRAINED_PATH = ""
    cfg.MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_ALPHA = reference["alpha"] if alpha is None else alpha
    cfg.MODEL.FC_CLIP.GEOMETRIC_ENSEMBLE_BETA = reference["beta"] if beta is None else beta
    cfg.MODEL.TEXT_EMBEDDING.CACHE_DIR = ""
    cfg.MODEL.TEXT_EMBEDDING.PROMPT_TEMPLATES = []  # FC-CLIP's release templates
    detections = released["TEST"]["DETECTIONS_PER_IMAGE"]
    cfg.TEST.DETECTIONS_PER_IMAGE = detections
    cfg.DATASETS.TRAIN = (TRAIN_NAME,)
    cfg.DATASETS.TEST = (TEST_NAME,)
    return cfg


def openseg_model(reference, **kwargs):
    model = build_model(openseg_cfg(reference, **kwargs))
    model.load_state_dict(released_to_openseg(released_state(reference)), strict=True)
    return model


def _heads(model, reference):
    with torch.no_grad():
        images = model.preprocess_images(detectron2_inputs(reference))
        return model.forward_heads(model.backbone(images.tensor))


def test_checkpoint_format_reads_and_writes_the_release(reference, tmp_path):
    released = released_state(reference)
    assert detect_format(list(released)).name == "fcclip"
    ours = released_to_openseg(released)
    back = openseg_to_released(ours)
    assert sorted(back) == sorted(released)
    assert all(back[k] is released[k] for k in released)
    assert ours["transformer_decoder.class_predictor.void_embedding.weight"] is released["void_embedding.weight"]
    # MODEL.WEIGHTS path: the checkpointer detects the layout and loads every key
    path = tmp_path / "fcclip_release.pth"
    torch.save({"model": released}, path)
    model = build_model(openseg_cfg(reference))
    incompatible = OpenSegCheckpointer(model).load(str(path))
    del incompatible
    for key, value in model.state_dict().items():
        if key in ours and not key.startswith("criterion."):  # derived from the config
            assert torch.equal(value, ours[key]), key


def test_seen_classes_and_class_splits_follow_the_release(reference):
    model = openseg_model(reference)
    assert model.seen_classes.int().tolist() == reference["seen"]
    seen = [i for i, s in enumerate(reference["seen"]) if s]
    assert MetadataCatalog.get(TEST_NAME).class_splits["seen"] == seen
    # the fixture tells the release's exact rule from openseg's plural-aware one ("dogs")
    plural_aware = seen_unseen_split(model.train_vocabulary, model.test_vocabulary)["seen"]
    assert plural_aware != seen


def test_convert_checkpoint_tool_both_ways(reference, tmp_path):
    """tools/convert_checkpoint.py: release -> openseg names -> release layout again."""
    tool = load_script("tools/convert_checkpoint.py")
    released = released_state(reference)
    source, ours, back = tmp_path / "release.pth", tmp_path / "openseg.pth", tmp_path / "back.pth"
    torch.save({"model": released}, source)
    assert tool.convert(str(source), str(ours)) == "fcclip"
    assert tool.convert(str(ours), str(back), to="fcclip") == "openseg"
    restored = read_checkpoint_file(str(back))["model"]
    assert sorted(restored) == sorted(released)
    for key, value in released.items():
        assert torch.equal(restored[key], value), key


def test_every_decoder_prediction_matches(reference):
    """In-vocabulary logits (mask-pooled head, synonym max, void) and masks of every layer."""
    model = openseg_model(reference).eval()
    outputs = _heads(model, reference)
    ours = outputs["aux_outputs"] + [outputs]
    assert len(ours) == len(reference["layers"])
    for index, (mine, theirs) in enumerate(zip(ours, reference["layers"])):
        for key in ("pred_logits", "pred_masks"):
            assert_close(mine[key], theirs[key], f"prediction {index} {key}")


def test_out_of_vocabulary_and_ensembled_logits_match(reference):
    model = openseg_model(reference).eval()
    outputs = _heads(model, reference)
    out_vocab = model.out_of_vocabulary_logits(outputs[CLIP_POOLING_FEATURES], outputs["pred_masks"])
    # the release's out-of-vocabulary logits carry the void column last; the ensemble drops it
    assert_close(out_vocab, reference["out_vocab_logits"][..., :-1], "out-of-vocabulary logits")
    ensembled = geometric_ensemble(
        outputs["pred_logits"], out_vocab, model.seen_classes, model.ensemble_alpha, model.ensemble_beta
    )
    for b, expected in enumerate(reference["ensembled"]):
        assert_close(ensembled[b], expected, f"image {b} ensembled log-probabilities")
    # ENSEMBLE_ON_VALID_MASK: queries without a mask on the CLIP grid keep p_in
    resized = torch.nn.functional.interpolate(
        outputs["pred_masks"], size=outputs[CLIP_POOLING_FEATURES].shape[-2:], mode="bilinear",
        align_corners=False,
    )
    valid = (resized > 0).flatten(2).any(-1)
    on_valid = geometric_ensemble(
        outputs["pred_logits"], out_vocab, model.seen_classes, model.ensemble_alpha,
        model.ensemble_beta, valid,
    )
    for b, expected in enumerate(reference["ensembled_valid_mask"]):
        assert_close(on_valid[b], expected, f"image {b} ensembled log-probabilities on valid masks")
    # the fixture tells alpha from beta: swapping them moves the result far beyond tolerance
    swapped = geometric_ensemble(
        outputs["pred_logits"], out_vocab, model.seen_classes, model.ensemble_beta, model.ensemble_alpha
    )
    assert (swapped[0] - reference["ensembled"][0]).abs().max() > 1e-2


def test_postprocessing_matches(reference):
    """Post-processing of the release's own ensembled logits and masks within 1e-5; end to end,
    the same decisions."""
    model = openseg_model(reference).eval()
    ensembled = torch.stack(reference["ensembled"])
    masks = reference["layers"][-1]["pred_masks"]
    results = postprocess_release_outputs(model, reference, ensembled, masks)
    assert_postprocessing_matches(results, reference, close=assert_close)
    with torch.no_grad():
        assert_decisions_match(model(detectron2_inputs(reference)), reference)


def test_swapped_alpha_and_beta_change_the_results(reference):
    model = openseg_model(reference, alpha=reference["beta"], beta=reference["alpha"]).eval()
    with torch.no_grad():
        results = model(detectron2_inputs(reference))
    differs = any(
        not torch.allclose(r["sem_seg"], e, atol=1e-3) for r, e in zip(results, reference["sem_seg"])
    )
    assert differs, "alpha and beta swapped, yet the semantic scores are unchanged"


def test_losses_point_sampling_and_gradients_match(reference, monkeypatch):
    model = openseg_model(reference).train()
    draws = record_criterion_rand(model, reference["criterion_seed"], monkeypatch)
    losses = model(detectron2_inputs(reference, with_targets=True))

    assert draws == reference["rand_shapes"], "points are drawn in another order or amount than the release"
    assert sorted(losses) == sorted(reference["losses"])
    for key, value in reference["losses"].items():
        assert_close(losses[key], value, key)

    sum(losses.values()).backward()
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    expected = released_to_openseg(reference["gradients"])
    assert sorted(gradients) == sorted(expected)
    for name, grad in expected.items():
        assert_close(gradients[name], grad, f"gradient of {name}")
