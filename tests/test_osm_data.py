"""OSM's training data as the release prepares it (train/data.py): the scale jitter (only images
smaller than the input are rescaled, longer side to int(s * S) as torchvision's
`resize(size=t - 1, max_size=t)`), zero padding, the same jitter for semantic data, and each
dataset of the mixture read with its own ignore label. Checked against torchvision's PIL
resize, numpy crops found by brute force and hand-written label maps."""

import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from detectron2.data import transforms as T
from PIL import Image

from openseg.config import load_config
from openseg.data.datasets.common import register_semantic
from openseg.data.mappers import build_mapper
from openseg.projects.osm.data import OSMScaleJitter, build_dataset_mappers, release_resize_hw

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo", "osm_tiny_test.yaml")
DATASET_16BIT = "test_osm_data_semantic16"


def _random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("hw, target", [((20, 30), 32), ((30, 20), 32), ((25, 25), 40), ((9, 70), 33), ((480, 640), 1119)])
def test_release_resize_size_matches_torchvision(hw, target):
    image = Image.fromarray(_random_image(*hw))
    if hw[0] == hw[1]:
        expected = TF.resize(image, target, interpolation=TF.InterpolationMode.BICUBIC)
    else:
        expected = TF.resize(image, target - 1, max_size=target, interpolation=TF.InterpolationMode.BICUBIC)
    assert release_resize_hw(*hw, target) == (expected.height, expected.width)


def test_scale_jitter_resizes_small_images_like_the_release():
    image = _random_image(20, 30)
    np.random.seed(3)
    scale = np.random.uniform(0.5, 1.5)
    target = int(scale * 40)
    expected = TF.resize(Image.fromarray(image), target - 1, max_size=target,
                         interpolation=TF.InterpolationMode.BICUBIC)
    np.random.seed(3)
    transform = OSMScaleJitter(40, 0.5, 1.5).get_transform(image)
    np.testing.assert_array_equal(transform.apply_image(image), np.asarray(expected))
    # an image whose shorter side reaches the input size keeps its size
    assert isinstance(OSMScaleJitter(20, 0.5, 1.5).get_transform(image), T.NoOpTransform)


def _cfg(*overrides):
    return load_config(CONFIG, list(overrides))


def test_large_image_is_cropped_unscaled_and_small_image_padded_with_zeros(tmp_path):
    from openseg.data.datasets.demo import generate_demo, load_demo

    demo_dir = generate_demo(tmp_path, num_train=1, num_val=1)
    record = load_demo(demo_dir, "train")[0]  # 128 x 128
    original = np.asarray(Image.open(record["file_name"]).convert("RGB"))
    np.random.seed(0)
    torch.manual_seed(0)
    mapper = build_mapper(_cfg("INPUT.DATASET_MAPPER_NAME", "panoptic_osm", "INPUT.IMAGE_SIZE", "96"), is_train=True)
    for _ in range(3):
        crop = mapper(record)["image"].permute(1, 2, 0).numpy()
        assert crop.shape == (96, 96, 3)
        found = [
            (y, x, flip)
            for flip in (False, True)
            for y in range(128 - 96 + 1)
            for x in range(128 - 96 + 1)
            if np.array_equal((original[:, ::-1] if flip else original)[y:y + 96, x:x + 96], crop)
        ]
        assert found, "the 96 px output is not an unscaled crop of the (flipped) 128 px image"
    # 128 < 160: rescaled to int(0.5 * 160) = 80 and padded with 0 (the release), not 128
    small = build_mapper(
        _cfg("INPUT.DATASET_MAPPER_NAME", "panoptic_osm", "INPUT.IMAGE_SIZE", "160",
             "INPUT.MIN_SCALE", "0.5", "INPUT.MAX_SCALE", "0.5"), is_train=True,
    )(record)
    image, masks = small["image"], small["instances"].gt_masks
    assert image.shape == (3, 160, 160)
    assert (image[:, 80:, :] == 0).all() and (image[:, :, 80:] == 0).all()
    assert image[:, :80, :80].float().mean() > 10
    assert not masks[:, 80:, :].any() and not masks[:, :, 80:].any()
    assert torch.equal(masks.sum(0)[:80, :80], torch.ones(80, 80, dtype=torch.long))


@pytest.fixture
def semantic16(tmp_path):
    """A 16-bit semantic dataset (ignore 65535) whose label 255 is a real class."""
    labels = np.zeros((20, 30), np.uint16)
    labels[:, 10:20] = 255
    labels[:, 20:] = 430
    labels[:5] = 65535
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(_random_image(20, 30)).save(tmp_path / "images" / "a.jpg")
    Image.fromarray(labels).save(tmp_path / "labels" / "a.tif")
    register_semantic(DATASET_16BIT, tmp_path / "images", tmp_path / "labels", "test fixture",
                      ignore_label=65535, stuff_classes=[f"c{i}" for i in range(459)])
    return labels


def test_mixture_reads_each_datasets_ignore_label_and_jitters_semantic_data(semantic16):
    from detectron2.data import DatasetCatalog

    cfg = _cfg("DATASETS.TRAIN", f"('openseg_demo_train', '{DATASET_16BIT}')",
               "MODEL.OSM.DATASET_MAPPERS", "['panoptic_osm', 'semantic_osm']",
               "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SCALE", "0.5", "INPUT.MAX_SCALE", "0.5")
    mappers = build_dataset_mappers(cfg)
    assert mappers["openseg_demo_train"].ignore_label == 255
    assert mappers[DATASET_16BIT].ignore_label == 65535
    np.random.seed(1)
    out = mappers[DATASET_16BIT](DatasetCatalog.get(DATASET_16BIT)[0])
    # 20 x 30 -> longer side int(0.5 * 64) = 32: (21, 32), padded to 64 x 64
    assert out["image"].shape == (3, 64, 64)
    assert (out["image"][:, 21:] == 0).all() and (out["image"][:, :, 32:] == 0).all()
    semantic = out["sem_seg"]
    assert (semantic[21:] == 65535).all() and (semantic[:, 32:] == 65535).all()
    assert out["instances"].gt_classes.tolist() == [0, 255, 430]
    for class_id, mask in zip([0, 255, 430], out["instances"].gt_masks):
        assert torch.equal(mask, semantic == class_id)
    assert (semantic[:3, :32] == 65535).all()  # the ignored top rows, scaled by 21 / 20


def test_mixture_config_has_the_six_datasets_of_the_paper():
    cfg = load_config(os.path.join(os.path.dirname(CONFIG), "..", "osm", "osm_final_mixture.yaml"))
    ratios = dict(zip(cfg.DATASETS.TRAIN, cfg.MODEL.OSM.DATASET_RATIOS))
    assert ratios == {
        "openseg_coco_2017_train_panoptic": 32.0, "openseg_lvis_v1_train": 64.0,
        "openseg_ade20k_train_panoptic": 16.0, "openseg_cityscapes_fine_panoptic_train": 8.0,
        "openseg_ade20k_full_sem_seg_train": 16.0, "openseg_pascal_context459_sem_seg_train": 8.0,
    }
    assert cfg.SOLVER.IMS_PER_BATCH == sum(ratios.values())
    assert all(name.endswith("_osm") for name in cfg.MODEL.OSM.DATASET_MAPPERS)
    modes = dict(entry.split(":") for entry in cfg.MODEL.OSM.DATASET_MODES)
    assert modes["openseg_pascal_context459_sem_seg_train"] == "pc459"
    assert set(modes) == set(ratios)


def test_mixture_loader_resumes_exactly():
    """The mixture goes through openseg's resumable loader (train_net's checkpoint hook saves
    its state): a loader restored after two batches gives the third batch of an uninterrupted
    one, with the same augmentation."""
    from openseg.projects.osm.data import build_mixture_train_loader

    cfg = _cfg("DATASETS.TRAIN", "('openseg_demo_train', 'openseg_demo_val')",
               "MODEL.OSM.DATASET_RATIOS", "[1.0, 3.0]", "MODEL.OSM.DATASET_MAPPERS", "['panoptic_osm', 'panoptic']",
               "SOLVER.IMS_PER_BATCH", "4", "SEED", "7")
    uninterrupted = iter(build_mixture_train_loader(cfg))
    first_two = [next(uninterrupted) for _ in range(2)]
    third = next(uninterrupted)
    interrupted = build_mixture_train_loader(cfg)
    batches = iter(interrupted)
    for expected in first_two:
        assert [x["file_name"] for x in next(batches)] == [x["file_name"] for x in expected]
    state = interrupted.state_dict()
    assert state["images_consumed"] == 8 and "sampler_seed" in state
    resumed = build_mixture_train_loader(cfg)
    resumed.load_state_dict(state)
    batch = next(iter(resumed))
    assert [(x["dataset_name"], x["file_name"]) for x in batch] == [(x["dataset_name"], x["file_name"]) for x in third]
    for got, expected in zip(batch, third):
        assert torch.equal(got["image"], expected["image"])
