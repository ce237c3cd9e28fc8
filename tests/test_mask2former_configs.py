"""openseg's Mask2Former configs hold every hyper-parameter of the released ones, key by key.

The released values were recorded by tools/reference_fixtures/mask2former_configs.py (each
released YAML merged as the release's train_net.py merges it). A released file
``configs/<dataset>/<task>/[swin/]<name>.yaml`` lives in openseg at
``configs/<dataset>/maskformer/<task>/[swin/]<name>.yaml``. Only names that are openseg's own
differ (datasets, mappers, meta-architecture, local weight files); keys that only detectron2's
DeepLab project or Mask2Former's unused modules read are listed with the reason."""
import json
import math
import os
from pathlib import Path

import pytest

from openseg.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECORDED = json.loads(
    (ROOT / "tests/fixtures/reference/mask2former_configs/configs.json").read_text())

DATASET_NAMES = {
    "coco_2017_train_panoptic": "openseg_coco_2017_train_panoptic",
    "coco_2017_val_panoptic_with_sem_seg": "openseg_coco_2017_val_panoptic",
    "coco_2017_train": "openseg_coco_2017_train_instance",
    "coco_2017_val": "openseg_coco_2017_val_instance",
    "ade20k_panoptic_train": "openseg_ade20k_train_panoptic",
    "ade20k_panoptic_val": "openseg_ade20k_val_panoptic",
    "ade20k_instance_train": "openseg_ade20k_instance_train",
    "ade20k_instance_val": "openseg_ade20k_instance_val",
    "ade20k_sem_seg_train": "openseg_ade20k_sem_seg_train",
    "ade20k_sem_seg_val": "openseg_ade20k_sem_seg_val",
    "cityscapes_fine_panoptic_train": "openseg_cityscapes_fine_panoptic_train",
    "cityscapes_fine_panoptic_val": "openseg_cityscapes_fine_panoptic_val",
    # the same images and labelTrainIds maps as openseg's panoptic registration
    "cityscapes_fine_sem_seg_train": "openseg_cityscapes_fine_panoptic_train",
    "cityscapes_fine_sem_seg_val": "openseg_cityscapes_fine_panoptic_val",
    "cityscapes_fine_instance_seg_train": "openseg_cityscapes_fine_instance_seg_train",
    "cityscapes_fine_instance_seg_val": "openseg_cityscapes_fine_instance_seg_val",
}
MAPPER_NAMES = {
    "coco_panoptic_lsj": "panoptic_lsj", "coco_instance_lsj": "instance_lsj",
    "mask_former_panoptic": "panoptic", "mask_former_instance": "instance",
    "mask_former_semantic": "semantic",
}
TRANSLATED = {
    "DATASETS.TRAIN": lambda names: [DATASET_NAMES[n] for n in names],
    "DATASETS.TEST": lambda names: [DATASET_NAMES[n] for n in names],
    "INPUT.DATASET_MAPPER_NAME": MAPPER_NAMES.__getitem__,
    "MODEL.META_ARCHITECTURE": {"MaskFormer": "OpenSegMaskFormer"}.__getitem__,
    # a local file of the same name: nothing is downloaded
    "MODEL.WEIGHTS": os.path.basename,
}
NOT_READ = {
    # added by detectron2's add_deeplab_config, read only by DeepLab heads / backbones
    **{f"MODEL.SEM_SEG_HEAD.{k}": "DeepLab head" for k in (
        "ASPP_CHANNELS", "ASPP_DILATIONS", "ASPP_DROPOUT", "LOSS_TYPE", "PROJECT_CHANNELS",
        "PROJECT_FEATURES", "USE_DEPTHWISE_SEPARABLE_CONV")},
    **{f"MODEL.RESNETS.{k}": "DeepLab ResNet" for k in (
        "RES4_DILATION", "RES5_MULTI_GRID", "STEM_TYPE")},
    # MaskFormer (v1) transformer encoder / detectron2 semantic head: not Mask2Former modules
    "MODEL.MASK_FORMER.ENC_LAYERS": "MaskFormer v1 decoder",
    "MODEL.SEM_SEG_HEAD.NAME": "heads are built by OpenSegMaskFormer, not by name",
    "MODEL.SEM_SEG_HEAD.LOSS_WEIGHT": "MaskFormerHead only",
}
EXCLUDED_SECTIONS = ("OUTPUT_DIR", "SEED", "CUDNN_BENCHMARK", "VIS_PERIOD", "GLOBAL.", "VERSION")


def flatten(node, prefix=""):
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def normalise(value):
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    return value


def same(a, b) -> bool:
    a, b = normalise(a), normalise(b)
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def openseg_path(released: str) -> Path:
    dataset, task, *rest = released.split("/")
    return ROOT / "configs" / dataset / "maskformer" / task / Path(*rest)


def test_every_released_entry_is_recorded():
    # MODEL_ZOO.md: COCO 7 + 7, ADE20K 3 + 3 + 8 (incl. R101 and the semantic Swins), Cityscapes 6 x 3
    assert len(RECORDED) == 43
    assert "coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml" in RECORDED


@pytest.mark.parametrize("released", sorted(RECORDED))
def test_config_mirrors_release_key_by_key(released):
    path = openseg_path(released)
    assert path.is_file(), f"no openseg config for the released {released} (expected {path})"
    ours = flatten(load_config(str(path)))
    differences = []
    for key, value in RECORDED[released].items():
        if key.startswith(EXCLUDED_SECTIONS) or key in NOT_READ:
            continue
        expected = TRANSLATED[key](value) if key in TRANSLATED and value else value
        if key not in ours:
            differences.append(f"{key}: missing in openseg (release: {value!r})")
        elif not same(ours[key], expected):
            differences.append(f"{key}: openseg {ours[key]!r}, release {expected!r}")
    assert not differences, f"{path.relative_to(ROOT)}:\n" + "\n".join(differences)


def test_coco_uses_multistep_and_ade20k_poly():
    """The two schedules the issue names, read through openseg's own config loading."""
    coco = load_config(str(ROOT / "configs/coco/maskformer/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml"))
    assert coco.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR"
    assert tuple(coco.SOLVER.STEPS) == (327778, 355092) and coco.SOLVER.MAX_ITER == 368750
    ade = load_config(str(ROOT / "configs/ade20k/maskformer/semantic-segmentation/maskformer2_R50_bs16_160k.yaml"))
    assert ade.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR" and ade.SOLVER.MAX_ITER == 160000


def test_schedules_follow_the_released_keys():
    """LR of the built scheduler at chosen iterations, computed by hand from the released
    values: multi-step (x0.1 at each of STEPS) for COCO, poly (power 0.9) for ADE20K."""
    import torch

    from openseg.engine.optimizer import build_lr_scheduler

    def lrs(config, iterations):
        cfg = load_config(str(ROOT / config))
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
        scheduler = build_lr_scheduler(cfg, optimizer)
        values = {}
        for target in iterations:  # the LR the scheduler gives at iteration `target`
            scheduler.last_epoch = target
            values[target] = scheduler.get_lr()[0]
        return values

    coco = lrs("configs/coco/maskformer/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml",
               [20, 327777, 327778, 355092])
    assert coco[20] == pytest.approx(1e-4)
    assert coco[327777] == pytest.approx(1e-4)
    assert coco[327778] == pytest.approx(1e-5)
    assert coco[355092] == pytest.approx(1e-6)
    ade = lrs("configs/ade20k/maskformer/semantic-segmentation/maskformer2_R50_bs16_160k.yaml",
              [0, 40000, 120000])
    for t, value in ade.items():
        assert value == pytest.approx(1e-4 * (1 - t / 160000) ** 0.9, rel=1e-6), t


def test_color_aug_ssd_in_the_released_place():
    """Resize, crop, SSD colour jitter, flip: the order of Mask2Former's semantic mapper."""
    from detectron2.data import transforms as T
    from detectron2.projects.point_rend import ColorAugSSDTransform

    from openseg.data.mappers import build_standard_augmentation

    cfg = load_config(str(ROOT / "configs/ade20k/maskformer/semantic-segmentation/maskformer2_R50_bs16_160k.yaml"))
    kinds = [type(a) for a in build_standard_augmentation(cfg, category_area_constraint=True)]
    assert kinds == [T.ResizeShortestEdge, T.RandomCrop_CategoryAreaConstraint,
                     ColorAugSSDTransform, T.RandomFlip]
    cfg.INPUT.COLOR_AUG_SSD = False
    assert ColorAugSSDTransform not in [type(a) for a in build_standard_augmentation(cfg, True)]


def test_detections_per_image_is_the_release_key(tmp_path):
    """Instance inference keeps TEST.DETECTIONS_PER_IMAGE detections, as the release reads it;
    openseg's former key under MODEL.MASK_FORMER.TEST fails naming the new one."""
    cfg = load_config(opts=["TEST.DETECTIONS_PER_IMAGE", "7"])
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 7
    assert "DETECTIONS_PER_IMAGE" not in cfg.MODEL.MASK_FORMER.TEST
    old = tmp_path / "old.yaml"
    old.write_text("MODEL:\n  MASK_FORMER:\n    TEST:\n      DETECTIONS_PER_IMAGE: 5\n")
    with pytest.raises(KeyError, match="renamed to TEST.DETECTIONS_PER_IMAGE"):
        load_config(str(old))
    with pytest.raises(KeyError, match="renamed to TEST.DETECTIONS_PER_IMAGE"):
        load_config(opts=["MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE", "5"])
