"""openseg's `OpenSegMaskFormer` computes what the released Mask2Former computes.

The fixtures (`tests/fixtures/reference/mask2former/fixtures.pt`) were produced by
`tools/make_reference_fixtures.py --reference-root ../shared/reference --only mask2former`
from the release's own `MaskFormer` meta-architecture with random weights (see
`tools/reference_fixtures/mask2former.py` for the size, the non-square inputs, the
query-dependent deformable offsets and the boundary cases). Here the weights go through
`openseg.checkpoint.mask2former.reference_to_openseg` into an openseg model built from the
same configuration values, and every output must agree within 1e-5:

* `pred_logits` / `pred_masks` of every decoder prediction (aux first to last, then final);
* which pixels every query may attend to in every masked cross-attention layer (exactly);
* semantic scores, panoptic segment map and segments (identical ids, classes), instance
  masks / classes / scores, with the panoptic overlap threshold set exactly at one
  segment's visible-area ratio (the release keeps it: ``<``);
* for a training step whose criterion starts from the same torch seed: the sequence of
  `torch.rand` draws (so openseg samples the same points), every weighted loss term and the
  gradient of every parameter.
"""
import pytest
import torch
import yaml
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from openseg.checkpoint.mask2former import (
    UnmappedKeysError,
    openseg_to_reference,
    reference_to_openseg,
)
from openseg.config import load_config

from reference_utils import (  # noqa: F401  (one_thread: autouse fixture)
    assert_close,
    assert_postprocessing_matches,
    assert_predictions_match,
    copy_config,
    detectron2_inputs,
    load_reference,
    one_thread,
    record_criterion_rand,
)

METADATA_NAME = "openseg_reference_mask2former_fixture"
# configuration groups copied from the release's config (same key names in openseg)
COPIED_GROUPS = ("BACKBONE", "RESNETS", "SEM_SEG_HEAD", "MASK_FORMER")


@pytest.fixture(scope="module")
def reference():
    return load_reference("mask2former")


def _openseg_model(reference, overlap_threshold=None):
    released = yaml.safe_load(reference["reference_config_yaml"])
    cfg = load_config()
    cfg.MODEL.META_ARCHITECTURE = "OpenSegMaskFormer"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PIXEL_MEAN = released["MODEL"]["PIXEL_MEAN"]
    cfg.MODEL.PIXEL_STD = released["MODEL"]["PIXEL_STD"]
    for group in COPIED_GROUPS:
        copy_config(cfg.MODEL[group], released["MODEL"][group])
    # the release's deformable encoder takes its head count from MASK_FORMER.NHEADS
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = released["MODEL"]["MASK_FORMER"]["NHEADS"]
    cfg.TEST.DETECTIONS_PER_IMAGE = released["TEST"]["DETECTIONS_PER_IMAGE"]
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = (
        reference["overlap_threshold"] if overlap_threshold is None else overlap_threshold
    )
    MetadataCatalog.get(METADATA_NAME).set(
        thing_dataset_id_to_contiguous_id=reference["thing_dataset_id_to_contiguous_id"]
    )
    cfg.DATASETS.TRAIN = (METADATA_NAME,)
    cfg.DATASETS.TEST = (METADATA_NAME,)
    model = build_model(cfg)
    model.load_state_dict(reference_to_openseg(reference["state_dict"]), strict=True)
    return model


def test_mapping_is_exact_inverse_and_covers_every_parameter(reference):
    released = reference["state_dict"]
    ours = reference_to_openseg(released)
    back = openseg_to_reference(ours)
    assert list(back) == list(released)
    assert all(back[k] is released[k] for k in released)
    assert sorted(ours) == sorted(_openseg_model(reference).state_dict())
    # the FPN convolution numbered from the finest input (adapter_1) is openseg's first
    assert "pixel_decoder.lateral_convs.0.weight" in ours
    assert ours["pixel_decoder.lateral_convs.0.weight"] is released["sem_seg_head.pixel_decoder.adapter_1.weight"]


def test_version_1_layout_maps_like_the_current_one(reference):
    """Checkpoints read from `.pkl` carry no module versions, and the release then renames
    `sem_seg_head.<pixel decoder key>` and `static_query` (its `_load_from_state_dict`);
    openseg reads such a layout to the same parameters. Back-converted state dicts are marked
    version 2 so the release keeps their names."""
    released = reference["state_dict"]
    version_1 = {
        key.replace("sem_seg_head.pixel_decoder.", "sem_seg_head.").replace(
            "predictor.query_feat", "predictor.static_query"
        ): value
        for key, value in released.items()
    }
    assert "sem_seg_head.adapter_1.weight" in version_1
    assert reference_to_openseg(version_1) == reference_to_openseg(released)
    back = openseg_to_reference(reference_to_openseg(version_1))
    assert list(back) == list(released)
    assert back._metadata["sem_seg_head"]["version"] == 2
    assert back._metadata["sem_seg_head.predictor"]["version"] == 2


def test_unmapped_keys_are_listed(reference):
    released = dict(reference["state_dict"])
    released["sem_seg_head.extra_head.weight"] = torch.zeros(1)
    released["clip_model.visual.proj"] = torch.zeros(1)
    with pytest.raises(UnmappedKeysError) as error:
        reference_to_openseg(released)
    assert error.value.unmapped == ["clip_model.visual.proj", "sem_seg_head.extra_head.weight"]
    assert "sem_seg_head.extra_head.weight" in str(error.value)
    with pytest.raises(UnmappedKeysError, match="pixel_decoder_typo.x"):
        openseg_to_reference({"pixel_decoder_typo.x": torch.zeros(1)})


def _raw_outputs(model, reference):
    """(outputs of forward_heads, attention masks [B, heads, Q, h*w] of every cross-attention)."""
    masks = []
    hooks = [
        layer.register_forward_pre_hook(lambda module, args: masks.append(args[4].clone()))
        for layer in model.transformer_decoder.transformer_cross_attention_layers
    ]
    try:
        with torch.no_grad():
            images = model.preprocess_images(detectron2_inputs(reference))
            outputs = model.forward_heads(model.backbone(images.tensor))
    finally:
        for hook in hooks:
            hook.remove()
    batch = images.tensor.shape[0]
    heads = model.transformer_decoder.num_heads
    return outputs, [m.view(batch, heads, *m.shape[1:]) for m in masks]


def test_every_decoder_layer_matches(reference):
    model = _openseg_model(reference).eval()
    outputs, _ = _raw_outputs(model, reference)
    assert_predictions_match(outputs, reference["layers"])


def test_masked_attention_attends_to_the_same_pixels(reference):
    model = _openseg_model(reference).eval()
    _, masks = _raw_outputs(model, reference)
    assert len(masks) == len(reference["attn_masks"])
    for layer, (mine, theirs) in enumerate(zip(masks, reference["attn_masks"])):
        for head in range(mine.shape[1]):
            differ = (mine[:, head] != theirs).sum().item()
            assert differ == 0, f"layer {layer} head {head}: {differ} query-pixel pairs blocked differently"


def test_postprocessing_matches(reference):
    model = _openseg_model(reference).eval()
    with torch.no_grad():
        results = model(detectron2_inputs(reference))
    assert_postprocessing_matches(results, reference)


def test_segment_exactly_at_the_overlap_threshold_is_kept(reference):
    """The fixture's threshold equals one segment's visible / own area: `<` keeps it, and a
    threshold one ulp above drops exactly that segment."""
    threshold = reference["overlap_threshold"]
    above = _openseg_model(reference, overlap_threshold=float(torch.nextafter(
        torch.tensor(threshold, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    ))).eval()
    with torch.no_grad():
        dropped = sum(len(r["panoptic_seg"][1]) for r in above(detectron2_inputs(reference)))
    kept = sum(len(p["segments_info"]) for p in reference["panoptic"])
    assert dropped == kept - 1


def test_losses_point_sampling_and_gradients_match(reference, monkeypatch):
    model = _openseg_model(reference).train()
    draws = record_criterion_rand(model, reference["criterion_seed"], monkeypatch)
    losses = model(detectron2_inputs(reference, with_targets=True))

    assert draws == reference["rand_shapes"], "points are drawn in another order or amount than the release"
    assert sorted(losses) == sorted(reference["losses"])
    for key, value in reference["losses"].items():
        assert_close(losses[key], value, key)

    sum(losses.values()).backward()
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    expected = reference_to_openseg(reference["gradients"])
    assert sorted(gradients) == sorted(expected)
    for name, grad in expected.items():
        assert_close(gradients[name], grad, f"gradient of {name}")
