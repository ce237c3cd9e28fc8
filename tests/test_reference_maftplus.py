"""openseg's `MAFTPlus` computes what the released MAFT+ (jiaosiyu1999/MAFT-Plus) computes.

The fixtures (`tests/fixtures/reference/maftplus/fixtures.pt`) were produced by
`tools/make_reference_fixtures.py --reference-root ../shared/reference --only maftplus` from
the release's own `MAFT_Plus` with the tiny random ConvNeXt CLIP of
`projects/maftplus/tiny_clip.py` and random weights everywhere (see
`tools/reference_fixtures/maftplus.py`: sizes, non-square inputs, boundary checks). The
weights go through the "maftplus" checkpoint format into an openseg model built from the same
configuration values, and within 1e-5 of their magnitude:

* in-vocabulary logits and masks of every decoder prediction;
* the transferred text embeddings, the CLIP classifier's logits and the CLIP-only class
  log-probabilities handed to post-processing;
* semantic scores, panoptic segments and instance masks / classes / scores;
* a training step from the same criterion seed: point draws, every loss term (set criterion,
  mask-aware, representation compensation) and every gradient (so the detached decoder
  inputs and the trained CLIP parts match too);
* the transfer's semantic-checkpoint form and the representation-compensation loss on square,
  wide and tall maps (module level).
"""
import open_clip
import pytest
import torch
import yaml
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from openseg.checkpoint import OpenSegCheckpointer, detect_format
from openseg.config import load_config
from openseg.projects.maftplus import (
    ContentDependentTransfer,
    openseg_to_released,
    released_to_openseg,
    representation_compensation_loss,
)
from openseg.projects.maftplus.tiny_clip import TINY_CLIP_MODEL_NAME

import reference_utils
from reference_utils import (  # noqa: F401  (one_thread: autouse fixture)
    assert_postprocessing_matches,
    assert_predictions_match,
    copy_config,
    detectron2_inputs,
    load_reference,
    one_thread,
    record_criterion_rand,
)

METADATA_NAME = "openseg_reference_maftplus_fixture"
# release loss names -> openseg's
LOSS_NAMES = {"ranking_loss": "loss_mask_aware", "rc_loss": "loss_rc"}


@pytest.fixture(scope="module")
def reference():
    return load_reference("maftplus")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """`reference_utils.assert_close` in float32."""
    reference_utils.assert_close(actual.float(), expected.float(), what)


def released_state(reference):
    """The release's float32 state dict (stored as float16 values, token tables compacted)."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in reference["state_dict"].items()}
    for name in ("backbone.clip_model.token_embedding.weight", "backbone_t.clip_model.token_embedding.weight"):
        table = torch.zeros(reference["token_table_shape"])
        table[reference["token_rows"]] = state[name]
        state[name] = table
    return state


def openseg_cfg(reference):
    released = yaml.safe_load(reference["reference_config_yaml"])
    names = reference["class_names"]
    if METADATA_NAME in MetadataCatalog.list():
        MetadataCatalog.remove(METADATA_NAME)
    MetadataCatalog.get(METADATA_NAME).set(
        stuff_classes=list(names),
        thing_classes=list(names[:3]),
        thing_dataset_id_to_contiguous_id=dict(reference["thing_dataset_id_to_contiguous_id"]),
        ignore_label=255,
        label_divisor=1000,
    )
    cfg = load_config("configs/maftplus/Base-MAFTPlus.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PIXEL_MEAN = released["MODEL"]["PIXEL_MEAN"]
    cfg.MODEL.PIXEL_STD = released["MODEL"]["PIXEL_STD"]
    for group in ("SEM_SEG_HEAD", "MASK_FORMER"):
        copy_config(cfg.MODEL[group], released["MODEL"][group], skip=("NAME",))
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = released["MODEL"]["MASK_FORMER"]["NHEADS"]
    assert released["MODEL"]["FC_CLIP"]["CLIP_MODEL_NAME"] == TINY_CLIP_MODEL_NAME
    cfg.MODEL.CLIP.MODEL_NAME = TINY_CLIP_MODEL_NAME
    assert open_clip.get_model_config(TINY_CLIP_MODEL_NAME)["embed_dim"] == released["MODEL"]["cdt_params"][0]
    cfg.MODEL.MAFT_PLUS.CDT_NUM_HEADS = released["MODEL"]["cdt_params"][1]
    # the release builds its transfer's panoptic form whenever PANOPTIC_ON is set
    cfg.MODEL.MAFT_PLUS.CDT_NORM_ON_UPDATE = released["MODEL"]["MASK_FORMER"]["TEST"]["PANOPTIC_ON"]
    cfg.MODEL.MAFT_PLUS.RC_LOSS_WEIGHT = released["MODEL"]["rc_weights"]
    cfg.MODEL.TEXT_EMBEDDING.CACHE_DIR = ""
    detections = released["TEST"]["DETECTIONS_PER_IMAGE"]
    cfg.TEST.DETECTIONS_PER_IMAGE = detections
    cfg.DATASETS.TRAIN = (METADATA_NAME,)
    cfg.DATASETS.TEST = (METADATA_NAME,)
    return cfg


def openseg_model(reference):
    model = build_model(openseg_cfg(reference))
    model.load_state_dict(released_to_openseg(released_state(reference)), strict=True)
    return model


def _heads(model, reference):
    with torch.no_grad():
        images = model.preprocess_images(detectron2_inputs(reference))
        return model.forward_heads(model.backbone(images.tensor))


def test_checkpoint_format_reads_and_writes_the_release(reference, tmp_path):
    released = released_state(reference)
    assert detect_format(list(released)).name == "maftplus"
    ours = released_to_openseg(released)
    back = openseg_to_released(ours)
    assert sorted(back) == sorted(released)
    assert all(back[k] is released[k] for k in released)
    assert ours["frozen_backbone.clip_model.logit_scale"] is released["backbone_t.clip_model.logit_scale"]
    assert ours["transfer.update.weight"] is released["cdt.cross_atten.MLP.weight"]
    # MODEL.WEIGHTS path: the checkpointer detects the layout and loads every key, including
    # the frozen CLIP, which differs from the fine-tuned one
    path = tmp_path / "maftp_release.pth"
    torch.save({"model": released}, path)
    model = build_model(openseg_cfg(reference))
    OpenSegCheckpointer(model).load(str(path))
    state = model.state_dict()
    for key, value in ours.items():
        if not key.startswith("criterion."):  # derived from the config
            assert torch.equal(state[key], value), key
    assert not torch.equal(
        state["backbone.clip_model.visual.trunk.stem.0.weight"],
        state["frozen_backbone.clip_model.visual.trunk.stem.0.weight"],
    )


def test_every_decoder_prediction_matches(reference):
    model = openseg_model(reference).eval()
    outputs = _heads(model, reference)
    assert_predictions_match(outputs, reference["layers"], close=assert_close)


def test_transfer_and_clip_logits_match(reference):
    model = openseg_model(reference).eval()
    outputs = _heads(model, reference)
    assert_close(outputs["transferred_text"], reference["transferred_text"], "transferred text")
    assert_close(outputs["clip_logits"], reference["clip_logits"], "CLIP classifier logits")


def test_clip_only_class_probabilities_and_postprocessing_match(reference):
    model = openseg_model(reference).eval()
    final = []
    real = model.inference_single_image

    def capture(mask_cls, mask_pred, image_size, height, width):
        final.append(mask_cls.clone())
        return real(mask_cls, mask_pred, image_size, height, width)

    model.inference_single_image = capture
    with torch.no_grad():
        results = model(detectron2_inputs(reference))
    for b, expected in enumerate(reference["final_logits"]):
        assert_close(final[b], expected, f"image {b} class log-probabilities")
    assert_postprocessing_matches(results, reference, close=assert_close)


def test_losses_point_sampling_and_gradients_match(reference, monkeypatch):
    model = openseg_model(reference).train()
    draws = record_criterion_rand(model, reference["criterion_seed"], monkeypatch)
    losses = model(detectron2_inputs(reference, with_targets=True))

    assert draws == reference["rand_shapes"], "points are drawn in another order or amount than the release"
    expected_losses = {LOSS_NAMES.get(k, k): v for k, v in reference["losses"].items()}
    assert sorted(losses) == sorted(expected_losses)
    for key, value in expected_losses.items():
        assert_close(losses[key], value, key)

    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(released_to_openseg({k: None for k in reference["trainable_parameters"]}))
    sum(losses.values()).backward()
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    expected = released_to_openseg(reference["gradients"])
    assert sorted(gradients) == sorted(expected)
    for name, grad in expected.items():
        assert_close(gradients[name], grad, f"gradient of {name}")


def test_transfer_semantic_form_matches(reference):
    case = reference["cdt_semantic"]
    transfer = ContentDependentTransfer(dim=32, num_heads=4, norm_on_update=False)
    renamed = released_to_openseg({"cdt.cross_atten." + k.split("cross_atten.", 1)[1]: v
                                   for k, v in case["state_dict"].items()})
    transfer.load_state_dict({k[len("transfer."):]: v for k, v in renamed.items()}, strict=True)
    with torch.no_grad():
        output = transfer(case["image"], case["text"])
    assert_close(output, case["output"], "transfer (semantic form)")
    # the panoptic form is a different function of the same weights
    transfer.norm_on_update = True
    with torch.no_grad():
        assert (transfer(case["image"], case["text"]) - case["output"]).abs().max() > 1e-2


def test_representation_compensation_matches_on_square_wide_and_tall_maps(reference):
    for case in reference["rc"]:
        loss = representation_compensation_loss(case["a"], case["b"], [1, 2, 4])
        assert_close(loss, case["loss"], f"representation compensation on {tuple(case['a'].shape)}")
