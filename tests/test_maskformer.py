"""OpenSegMaskFormer end to end on a tiny ResNet-18-like model and synthetic 64x64 inputs."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from openseg.config import add_openseg_config
from openseg.modeling.meta_arch import OpenSegMaskFormer

DATASET = "openseg_test_maskformer_tiny"
NUM_CLASSES = 3  # 0, 1 things; 2 stuff


@pytest.fixture(scope="module", autouse=True)
def tiny_metadata():
    if DATASET in MetadataCatalog.list():
        MetadataCatalog.remove(DATASET)
    MetadataCatalog.get(DATASET).set(
        thing_classes=["cat", "dog"],
        stuff_classes=["cat", "dog", "grass"],
        thing_dataset_id_to_contiguous_id={1: 0, 2: 1},
        stuff_dataset_id_to_contiguous_id={1: 0, 2: 1, 3: 2},
    )
    yield
    MetadataCatalog.remove(DATASET)


def tiny_cfg(class_agnostic: bool = False):
    cfg = get_cfg()
    add_openseg_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "OpenSegMaskFormer"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    head = cfg.MODEL.SEM_SEG_HEAD
    head.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    head.NUM_CLASSES = NUM_CLASSES
    head.CONVS_DIM = 32
    head.MASK_DIM = 32
    head.NORM = "GN"
    head.TRANSFORMER_ENC_LAYERS = 2
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 4
    mf = cfg.MODEL.MASK_FORMER
    mf.HIDDEN_DIM = 32
    mf.NHEADS = 4
    mf.DIM_FEEDFORWARD = 64
    mf.DEC_LAYERS = 3
    mf.NUM_OBJECT_QUERIES = 8
    mf.TRAIN_NUM_POINTS = 64
    mf.CLASS_AGNOSTIC = class_agnostic
    mf.TEST.SEMANTIC_ON = True
    mf.TEST.PANOPTIC_ON = True
    mf.TEST.INSTANCE_ON = True
    mf.TEST.OBJECT_MASK_THRESHOLD = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    cfg.DATASETS.TRAIN = (DATASET,)
    cfg.DATASETS.TEST = (DATASET,)
    return cfg


def synthetic_batch():
    """Two images of different sizes (padded to 64x64) whose original size differs again."""
    generator = torch.Generator().manual_seed(0)
    batch = []
    for (h, w), (out_h, out_w), bitmasks in [
        ((64, 64), (80, 72), False),
        ((56, 48), (40, 30), True),
    ]:
        image = torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
        masks = torch.zeros(3, h, w, dtype=torch.bool)
        masks[0, : h // 2, : w // 2] = True
        masks[1, h // 2 :, w // 3 :] = True
        masks[2, : h // 2, w // 2 :] = True
        image[:, masks[0]] = 200  # make the first segment visible in the image
        instances = Instances((h, w))
        instances.gt_classes = torch.tensor([0, 1, 2])
        instances.gt_masks = BitMasks(masks) if bitmasks else masks
        batch.append({"image": image, "height": out_h, "width": out_w, "instances": instances})
    return batch


def test_training_losses_backward_and_overfit():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    assert isinstance(model, OpenSegMaskFormer)
    assert model.thing_ids == {0, 1}
    model.train()
    batch = synthetic_batch()
    losses = model(batch)
    expected = {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.transformer_decoder.class_predictor.weight.grad.abs().sum() > 0

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = sum(model(batch).values())
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-3:]) / 3 < 0.8 * sum(history[:3]) / 3, history


def test_targets_padded_like_images():
    model = build_model(tiny_cfg())
    batch = synthetic_batch()
    images = model.preprocess_images(batch)
    assert images.tensor.shape[-2:] == (64, 64)
    targets = model.prepare_targets(batch, images)
    second = targets[1]["masks"]
    assert second.shape == (3, 64, 64) and second.dtype == torch.bool
    assert torch.equal(second[:, :56, :48], batch[1]["instances"].gt_masks.tensor)
    assert not second[:, 56:].any() and not second[:, :, 48:].any()
    assert targets[0]["labels"].tolist() == [0, 1, 2]
    with pytest.raises(KeyError, match="instances"):
        model.prepare_targets([{"image": batch[0]["image"]}], images)


def test_inference_formats_and_sizes():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.eval()
    batch = synthetic_batch()
    with torch.no_grad():
        outputs = model([{k: v for k, v in x.items() if k != "instances"} for x in batch])
    assert len(outputs) == 2
    for x, out in zip(batch, outputs):
        size = (x["height"], x["width"])
        assert set(out) == {"sem_seg", "panoptic_seg", "instances"}
        assert out["sem_seg"].shape == (NUM_CLASSES, *size)
        panoptic_seg, segments_info = out["panoptic_seg"]
        assert panoptic_seg.shape == size and panoptic_seg.dtype == torch.int32
        assert isinstance(segments_info, list)
        ids = set(panoptic_seg.unique().tolist()) - {0}
        assert ids <= {s["id"] for s in segments_info}
        for segment in segments_info:
            assert set(segment) == {"id", "isthing", "category_id"}
            assert segment["isthing"] == (segment["category_id"] in {0, 1})
        instances = out["instances"]
        assert isinstance(instances, Instances) and instances.image_size == size
        assert 0 < len(instances) <= 5
        assert instances.pred_masks.shape[1:] == size and instances.pred_masks.dtype == torch.bool
        assert isinstance(instances.pred_boxes, Boxes)
        assert set(instances.pred_classes.tolist()) <= {0, 1}  # panoptic_on: things only

    model.sem_seg_postprocess_before_inference = True
    with torch.no_grad():
        resized_first = model(batch)
    for x, out, other in zip(batch, resized_first, outputs):
        assert out["sem_seg"].shape == (NUM_CLASSES, x["height"], x["width"])
        # resizing mask logits before or after the per-pixel class sum differs only by
        # interpolation error
        assert (out["sem_seg"] >= 0).all()
        assert (out["sem_seg"] - other["sem_seg"]).abs().mean() < 0.05


def test_class_agnostic_mode():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(class_agnostic=True))
    assert model.criterion.num_classes == 1
    assert (model.semantic_on, model.panoptic_on, model.instance_on) == (False, False, True)
    batch = synthetic_batch()
    images = model.preprocess_images(batch)
    assert all(t["labels"].tolist() == [0, 0, 0] for t in model.prepare_targets(batch, images))
    model.train()
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        outputs = model(batch)
    for x, out in zip(batch, outputs):
        assert set(out) == {"instances"}
        instances = out["instances"]
        assert instances.image_size == (x["height"], x["width"])
        assert len(instances) == 5 and instances.pred_classes.tolist() == [0] * 5


@pytest.mark.parametrize("divisibility, expected", [(-1, 16), (0, 0), (32, 32)])
def test_size_divisibility_follows_the_release(divisibility, expected, monkeypatch):
    """MASK_FORMER.SIZE_DIVISIBILITY: negative defers to the backbone (here one that asks
    for 16), 0 pads nothing, as in Mask2Former's MaskFormer."""
    from detectron2.modeling.backbone import ResNet

    monkeypatch.setattr(ResNet, "size_divisibility", property(lambda self: 16))
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = divisibility
    assert build_model(cfg).size_divisibility == expected


def test_semantic_scores_use_resized_masks_when_panoptic_or_instance_is_on():
    """As the release: with panoptic or instance output on, masks are resized to the output
    size before semantic inference even if SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE is False."""
    for panoptic, instance, expected in [(True, False, True), (False, True, True), (False, False, False)]:
        cfg = tiny_cfg()
        cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = panoptic
        cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = instance
        cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
        assert build_model(cfg).sem_seg_postprocess_before_inference is expected
