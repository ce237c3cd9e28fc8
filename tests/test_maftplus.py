"""MAFT+ on the tiny random CLIP of `projects/maftplus/tiny_clip.py`: the two losses by hand,
what trains, CLIP-only inference, the segmentation oracle's classifier and the demo config end
to end (`tests/test_reference_maftplus.py` compares with the release)."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from openseg.config import load_config
from openseg.data.mappers import build_mapper
from openseg.modeling.oracles import IMPOSSIBLE_LOGIT
from openseg.projects.fcclip.meta_arch import CLIP_POOLING_FEATURES
from openseg.projects.maftplus import MAFTPlus, mask_aware_loss, pyramid_pooling
from script_utils import load_script

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(ROOT / "configs" / "demo" / "maftplus_pico_convnext.yaml")
SMALL = ["DATALOADER.NUM_WORKERS", "0", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "4",
         "MODEL.MASK_FORMER.DEC_LAYERS", "2", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256"]


def demo_cfg(*opts):
    return load_config(DEMO_CONFIG, SMALL + list(opts))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(demo_cfg()).eval()


def _batch(cfg, is_train, count=2):
    name = "openseg_demo_train" if is_train else "openseg_demo_val"
    mapper = build_mapper(cfg, is_train=is_train)
    return [mapper(record) for record in DatasetCatalog.get(name)[:count]]


def test_mask_aware_loss_by_hand():
    """For every GT segment and query: soft IoU of sigmoid(mask) with the segment, min-max
    normalised over queries, smooth-L1 against softmax(logits[:K])[gt class]."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4 + 1)
    masks = torch.randn(2, 3, 4, 6)
    targets = [
        {"labels": torch.tensor([1, 3]), "masks": torch.rand(2, 8, 12) > 0.5},
        {"labels": torch.tensor([0]), "masks": torch.rand(1, 8, 12) > 0.5},
    ]
    predicted, wanted = [], []
    for b, target in enumerate(targets):
        probs = logits[b, :, :4].softmax(-1)
        up = F.interpolate(masks[b : b + 1].sigmoid(), size=(8, 12), mode="bilinear", align_corners=False)[0]
        for label, gt in zip(target["labels"], target["masks"].float()):
            ious = torch.stack([(gt * m).sum() / (gt.sum() + m.sum() - (gt * m).sum() + 1e-7) for m in up])
            wanted.append((ious - ious.min()) / (ious.max() - ious.min() + 1e-8))
            predicted.append(probs[:, label])
    diff = (torch.stack(predicted) - torch.stack(wanted)).abs()
    expected = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
    torch.testing.assert_close(mask_aware_loss(logits, masks, targets), expected, rtol=1e-6, atol=1e-7)
    # no gradient reaches the masks; the classifier gets one
    logits.requires_grad_(True)
    masks.requires_grad_(True)
    mask_aware_loss(logits, masks, targets).backward()
    assert masks.grad is None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="FILTER_EMPTY_ANNOTATIONS"):
        mask_aware_loss(logits, masks, [{"labels": torch.zeros(0, dtype=torch.long),
                                        "masks": torch.zeros(0, 8, 12, dtype=torch.bool)}] * 2)


def test_pyramid_pooling_by_hand_on_a_wide_map():
    """A 2 x 4 map is resized to 4 x 4, then pooled with windows of the original width // s
    (4, 2): row and column sums of the pooled cells (the release's descriptor)."""
    x = torch.arange(8.0).view(1, 1, 2, 4)
    square = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    whole = square.mean()
    quads = F.avg_pool2d(square, 2)[0, 0]  # [[a, b], [c, d]]
    expected = torch.cat([
        whole.view(1), whole.view(1),
        quads.sum(0), quads.sum(1),
    ])
    torch.testing.assert_close(pyramid_pooling(x, [1, 2])[0], expected)
    with pytest.raises(ValueError, match="RC_POOL_SCALES"):
        pyramid_pooling(torch.zeros(1, 1, 5, 3), [1, 2, 4])


def test_training_trains_the_clip_trunk_through_the_clip_losses_only():
    torch.manual_seed(0)
    cfg = demo_cfg()
    model = build_model(cfg).train()
    assert isinstance(model, MAFTPlus)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.clip_model.visual.trunk.stages.") for n in trainable)
    assert not any(n.startswith("frozen_backbone.") for n in trainable)
    assert not any(n.startswith("backbone.") and ("trunk.head" in n or "visual.head" in n
                   or "transformer" in n or "token_embedding" in n or "logit_scale" in n) for n in trainable)
    # both CLIPs start equal; the frozen one stays in eval mode
    assert torch.equal(model.backbone.clip_model.visual.trunk.stem[0].weight,
                       model.frozen_backbone.clip_model.visual.trunk.stem[0].weight)
    assert not model.frozen_backbone.clip_model.training

    losses = model(_batch(cfg, is_train=True))
    assert {"loss_mask_aware", "loss_rc", "loss_ce", "loss_mask", "loss_dice"} <= set(losses)
    assert float(losses["loss_rc"].detach()) == 0.0  # equal CLIPs: nothing to compensate yet
    set_losses = sum(v for k, v in losses.items() if k not in ("loss_mask_aware", "loss_rc"))
    set_losses.backward(retain_graph=True)
    trunk = model.backbone.clip_model.visual.trunk.stages[0].blocks[0].conv_dw.weight
    assert trunk.grad is None or trunk.grad.abs().sum() == 0, "decoder losses reached the CLIP"
    assert model.pixel_decoder.input_proj[0][0].weight.grad.abs().sum() > 0
    losses["loss_mask_aware"].backward()
    assert trunk.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.frozen_backbone.parameters())


def test_representation_compensation_grows_as_the_clips_drift():
    torch.manual_seed(0)
    cfg = demo_cfg()
    model = build_model(cfg).train()
    with torch.no_grad():
        for p in model.backbone.clip_model.visual.trunk.stages[3].parameters():
            p.add_(0.5 * torch.randn_like(p))
    losses = model(_batch(cfg, is_train=True))
    assert float(losses["loss_rc"]) > 0
    weight = cfg.MODEL.MAFT_PLUS.RC_LOSS_WEIGHT
    assert weight == 0.1


def test_inference_classifies_with_clip_only(model):
    """p(c) = softmax(CLIP logits)(c) * (1 - p_void), p_void from the in-vocabulary head."""
    batch = _batch(demo_cfg(), is_train=False, count=1)
    captured = []
    real = model.inference_single_image

    def capture(mask_cls, *args):
        captured.append(mask_cls)
        return real(mask_cls, *args)

    model.inference_single_image = capture
    try:
        with torch.no_grad():
            images = model.preprocess_images(batch)
            outputs = model.forward_heads(model.backbone(images.tensor))
            model.postprocess(outputs, batch, images)
    finally:
        del model.inference_single_image
    void = outputs["pred_logits"][0].softmax(-1)[:, -1:]
    expected = torch.cat([outputs["clip_logits"][0, :, :-1].softmax(-1) * (1 - void), void], dim=-1)
    torch.testing.assert_close(captured[0].exp(), expected + 1e-8, atol=1e-6, rtol=1e-5)
    # the in-vocabulary class scores play no part: only their void column does
    assert outputs["clip_logits"].shape[-1] == outputs["pred_logits"].shape[-1]


def test_segmentation_oracle_classifies_masks_with_the_transferred_text(model):
    batch = _batch(demo_cfg(), is_train=False, count=1)
    with torch.no_grad():
        images = model.preprocess_images(batch)
        outputs = model.forward_heads(model.backbone(images.tensor))
    height, width = images.tensor.shape[-2:]
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, : height // 2] = True
    masks[1, :, : width // 3] = True
    dummy = torch.zeros(4, 9)
    logits = model.classify_masks(outputs, 0, masks, dummy, None, (height, width))
    features = outputs[CLIP_POOLING_FEATURES][0]
    cells = masks.float()[:, None]
    coverage = F.interpolate(cells, size=features.shape[-2:], mode="area")[:, 0]
    expected = []
    for weights in coverage:
        pooled = (features * weights).sum((-2, -1)) / weights.sum()
        embedded = F.normalize(model.backbone.embed_pooled(pooled[None]), dim=-1)[0]
        scale = model.backbone.clip_model.logit_scale.exp().clamp(max=100.0)
        sims = scale * outputs["transferred_text"][0, :-1] @ embedded
        per_class, start = [], 0
        for count in model.classifier.synonym_counts:
            per_class.append(sims[start : start + count].max())
            start += count
        expected.append(torch.stack(per_class).log_softmax(-1))
    torch.testing.assert_close(logits[:, :-1], torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert (logits[:, -1] == IMPOSSIBLE_LOGIT).all()


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="CDT_NUM_HEADS"):
        build_model(demo_cfg("MODEL.MAFT_PLUS.CDT_NUM_HEADS", "5"))


def test_demo_config_trains_and_evaluates_end_to_end(tmp_path):
    train_net = load_script("tools/train_net.py")
    from detectron2.engine import default_argument_parser

    args = default_argument_parser().parse_args([
        "--config-file", DEMO_CONFIG, *SMALL, "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "2",
        "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(tmp_path),
    ])
    results = train_net.main(args)
    assert {"panoptic_seg", "sem_seg", "segm"} <= set(results)
    assert os.path.isfile(tmp_path / "model_final.pth")


@pytest.mark.parametrize("switches", [
    ("segmentation",), ("classification",), ("mask_selection",), ("drop_no_object",),
    ("segmentation", "classification"),
])
def test_every_oracle_switch_runs_through_the_shared_inference(model, switches):
    """The shared `TEST.ORACLE.*` switches apply to MAFT+'s CLIP-only probabilities; with
    ground-truth masks and classes the panoptic output is the ground truth."""
    import numpy as np
    from panopticapi.utils import rgb2id
    from PIL import Image

    from openseg.modeling.oracles import OracleSwitches

    record = DatasetCatalog.get("openseg_demo_val")[0]
    # any oracle switch makes the test mapper keep the ground truth
    mapped = build_mapper(demo_cfg("TEST.ORACLE.CLASSIFICATION", "True"), is_train=False)(record)
    model.oracles = OracleSwitches(**{name: True for name in switches})
    try:
        with torch.no_grad():
            output = model([mapped])[0]
    finally:
        model.oracles = OracleSwitches()
    assert {"sem_seg", "panoptic_seg", "instances"} <= set(output)
    if switches == ("segmentation", "classification"):
        gt_ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
        id_map, segments = output["panoptic_seg"]
        classes = {s["id"]: s["category_id"] for s in segments}
        for segment in record["segments_info"]:
            ids = np.unique(id_map.numpy()[gt_ids == segment["id"]])
            assert len(ids) == 1 and classes[int(ids[0])] == segment["category_id"]
