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
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances

from openseg.checkpoint import OpenSegCheckpointer, detect_format
from openseg.config import load_config
from openseg.projects.maftplus import (
    ContentDependentTransfer,
    openseg_to_released,
    released_to_openseg,
    representation_compensation_loss,
)
from openseg.projects.maftplus.tiny_clip import TINY_CLIP_MODEL_NAME

FIXTURE = Path(__file__).parent / "fixtures" / "reference" / "maftplus" / "fixtures.pt"
METADATA_NAME = "openseg_reference_maftplus_fixture"
TOLERANCE = 1e-5
# release loss names -> openseg's
LOSS_NAMES = {"ranking_loss": "loss_mask_aware", "rc_loss": "loss_rc"}


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE, weights_only=False)


@pytest.fixture(autouse=True)
def one_thread():
    """The fixtures were computed with one thread; more threads change summation orders."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Elementwise within TOLERANCE x max(1, max |expected|)."""
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=TOLERANCE, atol=TOLERANCE * scale,
        msg=lambda m: f"{what}: {m}",
    )


def released_state(reference):
    """The release's float32 state dict (stored as float16 values, token tables compacted)."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in reference["state_dict"].items()}
    for name in ("backbone.clip_model.token_embedding.weight", "backbone_t.clip_model.token_embedding.weight"):
        table = torch.zeros(reference["token_table_shape"])
        table[reference["token_rows"]] = state[name]
        state[name] = table
    return state


def _copy(node, values):
    for key, value in values.items():
        if key not in node or key == "NAME":
            continue
        if isinstance(value, dict):
            _copy(node[key], value)
        else:
            node[key] = tuple(value) if isinstance(node[key], tuple) else value


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
        _copy(cfg.MODEL[group], released["MODEL"][group])
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


def _inputs(reference, with_targets=False):
    inputs = []
    for i, (image, (height, width)) in enumerate(zip(reference["images"], reference["output_sizes"])):
        record = {"image": image, "height": height, "width": width}
        if with_targets:
            instances = Instances(tuple(image.shape[-2:]))
            instances.gt_classes = reference["targets"][i]["labels"]
            instances.gt_masks = reference["targets"][i]["masks"]
            record["instances"] = instances
        inputs.append(record)
    return inputs


def _heads(model, reference):
    with torch.no_grad():
        images = model.preprocess_images(_inputs(reference))
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
    ours = outputs["aux_outputs"] + [outputs]
    assert len(ours) == len(reference["layers"])
    for index, (mine, theirs) in enumerate(zip(ours, reference["layers"])):
        for key in ("pred_logits", "pred_masks"):
            assert_close(mine[key], theirs[key], f"prediction {index} {key}")


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
        results = model(_inputs(reference))
    for b, expected in enumerate(reference["final_logits"]):
        assert_close(final[b], expected, f"image {b} class log-probabilities")
    for b, result in enumerate(results):
        assert_close(result["sem_seg"], reference["sem_seg"][b], f"image {b} sem_seg")
        segment_map, segments = result["panoptic_seg"]
        expected = reference["panoptic"][b]
        assert segments == expected["segments_info"]
        assert torch.equal(segment_map, expected["segment_map"])
        instances, theirs = result["instances"], reference["instances"][b]
        mine_order = instances.scores.argsort(descending=True)
        their_order = theirs["scores"].argsort(descending=True)
        assert torch.equal(instances.pred_classes[mine_order], theirs["pred_classes"][their_order])
        assert_close(instances.scores[mine_order], theirs["scores"][their_order], f"image {b} scores")
        assert torch.equal(instances.pred_masks[mine_order].bool(), theirs["pred_masks"][their_order])


def test_losses_point_sampling_and_gradients_match(reference, monkeypatch):
    model = openseg_model(reference).train()
    draws = []
    real_rand = torch.rand

    def recording_rand(*size, **kwargs):
        draws.append(tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else tuple(size))
        return real_rand(*size, **kwargs)

    def seed(module, args):
        torch.manual_seed(reference["criterion_seed"])
        monkeypatch.setattr(torch, "rand", recording_rand)

    model.criterion.register_forward_pre_hook(seed)
    model.criterion.register_forward_hook(lambda *args: monkeypatch.setattr(torch, "rand", real_rand))
    losses = model(_inputs(reference, with_targets=True))

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
