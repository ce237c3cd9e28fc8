"""Mappers on the demo data, checked against the annotation files decoded independently
(panopticapi's rgb2id, pycocotools) and transformed by hand (numpy flip / repeat)."""

import copy
import json

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from panopticapi.utils import rgb2id
from PIL import Image
from pycocotools import mask as mask_util

from openseg.config import add_openseg_config
from openseg.data.datasets.demo import generate_demo, load_demo, split_paths
from openseg.data.mappers import (
    MAPPER_REGISTRY,
    AnnotationError,
    DataFileError,
    InstanceDatasetMapper,
    PanopticDatasetMapper,
    SemanticDatasetMapper,
    build_mapper,
)

SIZE = 128


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    demo_dir = generate_demo(tmp_path_factory.mktemp("datasets"), num_train=3, num_val=3)
    return demo_dir, load_demo(demo_dir, "val")


def flip_and_double():
    """A known geometric transform: horizontal flip, then 2x nearest upsampling."""
    return [
        T.HFlipTransform(SIZE),
        T.ResizeTransform(SIZE, SIZE, 2 * SIZE, 2 * SIZE, Image.NEAREST),
    ]


def reference(array: np.ndarray) -> np.ndarray:
    """`flip_and_double` by hand: 2x nearest upsampling is a pixel repeat."""
    return np.flip(array, axis=1).repeat(2, axis=0).repeat(2, axis=1)


def make_cfg(mapper_name: str = "panoptic"):
    cfg = get_cfg()
    add_openseg_config(cfg)
    cfg.INPUT.DATASET_MAPPER_NAME = mapper_name
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def test_panoptic_mapper_matches_png(demo):
    torch.manual_seed(0)
    _, dicts = demo
    mapper = PanopticDatasetMapper(True, augmentations=flip_and_double(), image_format="RGB")
    for record in dicts:
        out = mapper(record)
        pan_ids = reference(
            rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
        )
        expected_masks = np.stack([pan_ids == s["id"] for s in record["segments_info"]])
        expected_classes = [s["category_id"] for s in record["segments_info"]]
        instances = out["instances"]
        assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 2 * SIZE, 2 * SIZE)
        assert instances.gt_classes.dtype == torch.int64
        assert instances.gt_classes.tolist() == expected_classes
        assert instances.gt_masks.dtype == torch.bool
        assert np.array_equal(instances.gt_masks.numpy(), expected_masks)
        for box, mask in zip(instances.gt_boxes.tensor.tolist(), expected_masks):
            ys, xs = np.nonzero(mask)
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        semantic = reference(np.asarray(Image.open(record["sem_seg_file_name"])))
        assert out["sem_seg"].dtype == torch.long
        assert np.array_equal(out["sem_seg"].numpy(), semantic)
        image = reference(np.asarray(Image.open(record["file_name"]).convert("RGB")))
        assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), image)
        assert out["file_name"] == record["file_name"] and "annotations" not in out
        assert "annotations" in record  # the catalog's dict is left untouched


def test_panoptic_mapper_drops_crowd_and_derives_semantic(demo):
    _, dicts = demo
    record = copy.deepcopy(dicts[0])
    crowd = record["segments_info"][-1]
    crowd["iscrowd"] = 1
    del record["sem_seg_file_name"]
    mapper = PanopticDatasetMapper(True, augmentations=[], image_format="RGB")
    out = mapper(record)
    assert len(out["instances"]) == len(record["segments_info"]) - 1
    semantic = np.asarray(Image.open(dicts[0]["sem_seg_file_name"]))
    assert np.array_equal(out["sem_seg"].numpy(), semantic)  # crowd pixels keep their class


def test_instance_mapper_matches_rle(demo):
    demo_dir, dicts = demo
    instances_json = json.loads(open(split_paths(demo_dir, "val")["json_file"]).read())
    mapper = InstanceDatasetMapper(True, augmentations=flip_and_double(), image_format="BGR")
    for record in dicts:
        out = mapper(record)
        annotations = [
            a for a in instances_json["annotations"] if a["image_id"] == record["image_id"]
        ]
        expected = np.stack(
            [reference(mask_util.decode(a["segmentation"])).astype(bool) for a in annotations]
        )
        assert out["instances"].gt_classes.tolist() == [a["category_id"] - 1 for a in annotations]
        assert np.array_equal(out["instances"].gt_masks.numpy(), expected)
        image = reference(np.asarray(Image.open(record["file_name"]).convert("RGB"))[:, :, ::-1])
        assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), image)


def test_instance_mapper_polygons_and_crowd(demo):
    _, dicts = demo
    record = copy.deepcopy(dicts[0])
    record["annotations"] = [
        {"category_id": 2, "segmentation": [[10, 10, 40, 10, 40, 30, 10, 30]], "iscrowd": 0},
        {"category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]], "iscrowd": 1},
    ]
    out = InstanceDatasetMapper(True, augmentations=[], image_format="RGB")(record)
    assert out["instances"].gt_classes.tolist() == [2]
    expected = mask_util.decode(
        mask_util.merge(mask_util.frPyObjects([[10, 10, 40, 10, 40, 30, 10, 30]], SIZE, SIZE))
    )
    assert np.array_equal(out["instances"].gt_masks[0].numpy(), expected.astype(bool))


def test_semantic_mapper_one_mask_per_class(demo):
    _, dicts = demo
    mapper = SemanticDatasetMapper(True, augmentations=flip_and_double(), image_format="RGB")
    for record in dicts:
        out = mapper(record)
        semantic = reference(np.asarray(Image.open(record["sem_seg_file_name"])))
        classes = sorted(set(np.unique(semantic).tolist()) - {255})
        assert out["instances"].gt_classes.tolist() == classes
        for class_id, mask in zip(classes, out["instances"].gt_masks.numpy()):
            assert np.array_equal(mask, semantic == class_id)
        assert np.array_equal(out["sem_seg"].numpy(), semantic)


def test_lsj_pads_with_ignore_and_no_mask(demo):
    torch.manual_seed(0)
    np.random.seed(0)
    _, dicts = demo
    cfg = make_cfg("panoptic_lsj")
    cfg.INPUT.IMAGE_SIZE = 160
    cfg.INPUT.MIN_SCALE = cfg.INPUT.MAX_SCALE = 0.5  # 128 -> 80 pixels, padded to 160
    mapper = build_mapper(cfg, is_train=True)
    out = mapper(dicts[0])
    assert out["image"].shape == (3, 160, 160)
    assert (out["image"][:, 80:, :] == 128).all() and (out["image"][:, :, 80:] == 128).all()
    assert (out["sem_seg"][80:, :] == 255).all() and (out["sem_seg"][:, 80:] == 255).all()
    assert (out["sem_seg"][:80, :80] != 255).all()
    masks = out["instances"].gt_masks
    assert masks.shape[1:] == (160, 160) and len(masks) == len(dicts[0]["segments_info"])
    assert not masks[:, 80:, :].any() and not masks[:, :, 80:].any()
    assert torch.equal(masks.sum(0)[:80, :80], torch.ones(80, 80, dtype=torch.long))


@pytest.mark.parametrize(
    "mapper_name", ["instance", "instance_lsj", "panoptic", "panoptic_lsj", "semantic"]
)
def test_image_without_masks_gives_empty_targets(demo, mapper_name):
    """No annotation left after dropping crowds (or none at all, or only ignore pixels): empty
    targets of the image's size, as detectron2's and Mask2Former's mappers give."""
    np.random.seed(0)
    _, dicts = demo
    record = copy.deepcopy(dicts[0])
    if mapper_name.startswith("instance"):
        record["annotations"] = [dict(a, iscrowd=1) for a in record["annotations"]]
    elif mapper_name.startswith("panoptic"):
        record["segments_info"] = [dict(s, iscrowd=1) for s in record["segments_info"]]
        record.pop("sem_seg_file_name", None)
    else:
        ignore = Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8))
        record["sem_seg_file_name"] = str(demo[0] / "all_ignore.png")
        ignore.save(record["sem_seg_file_name"])
    cfg = make_cfg(mapper_name)
    cfg.INPUT.IMAGE_SIZE = 96
    out = build_mapper(cfg, is_train=True)(record)
    instances = out["instances"]
    height, width = out["image"].shape[-2:]
    assert instances.image_size == (height, width)
    assert instances.gt_classes.dtype == torch.int64 and instances.gt_classes.shape == (0,)
    assert instances.gt_masks.dtype == torch.bool and instances.gt_masks.shape == (0, height, width)
    assert len(instances.gt_boxes) == 0


def test_instance_mapper_on_an_image_with_no_annotations(demo):
    _, dicts = demo
    record = dict(copy.deepcopy(dicts[0]), annotations=[])
    out = build_mapper(make_cfg("instance"), is_train=True)(record)
    assert out["instances"].gt_masks.shape == (0, *out["image"].shape[-2:])


def test_registry_names_and_test_mapper(demo):
    _, dicts = demo
    # projects add their own (OSM's *_osm) when imported
    assert {name for name, _ in MAPPER_REGISTRY} >= {
        "panoptic",
        "panoptic_lsj",
        "instance",
        "instance_lsj",
        "semantic",
        "referring",
    }
    cfg = make_cfg("semantic")
    cfg.INPUT.MIN_SIZE_TEST = 64
    out = build_mapper(cfg, is_train=False)(dicts[0])
    assert out["image"].shape == (3, 64, 64)
    assert "instances" not in out and "sem_seg" not in out
    assert (out["height"], out["width"]) == (SIZE, SIZE)
    cfg.INPUT.DATASET_MAPPER_NAME = "nope"
    with pytest.raises(KeyError, match="nope"):
        build_mapper(cfg, is_train=True)


def test_standard_train_mapper_from_config_with_size_divisibility(demo):
    np.random.seed(0)
    _, dicts = demo
    cfg = make_cfg("instance")
    cfg.INPUT.MIN_SIZE_TRAIN = (100,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.SIZE_DIVISIBILITY = 32
    out = build_mapper(cfg, is_train=True)(dicts[0])
    assert out["image"].shape == (3, 128, 128)  # 100 padded to the next multiple of 32
    assert (out["image"][:, 100:, :] == 128).all()
    assert not out["instances"].gt_masks[:, 100:, :].any()
    assert out["instances"].image_size == (128, 128)


def test_corrupt_or_missing_files_name_the_file(demo, tmp_path):
    _, dicts = demo
    mapper = PanopticDatasetMapper(True, augmentations=[], image_format="RGB")
    corrupt_image = tmp_path / "corrupt.jpg"
    corrupt_image.write_bytes(b"\x00garbage, not a jpeg" * 10)
    with pytest.raises(DataFileError, match="corrupt.jpg"):
        mapper({**dicts[0], "file_name": str(corrupt_image)})
    with pytest.raises(DataFileError, match="missing.jpg"):
        mapper({**dicts[0], "file_name": str(tmp_path / "missing.jpg")})
    corrupt_png = tmp_path / "corrupt.png"
    corrupt_png.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataFileError, match="corrupt.png"):
        mapper({**dicts[0], "pan_seg_file_name": str(corrupt_png)})


def test_missing_keys_name_key_and_file(demo):
    _, dicts = demo
    record = copy.deepcopy(dicts[0])
    del record["segments_info"]
    with pytest.raises(AnnotationError, match=r"1000001\.jpg.*'segments_info'"):
        PanopticDatasetMapper(True, augmentations=[], image_format="RGB")(record)
    record = copy.deepcopy(dicts[0])
    del record["annotations"][0]["category_id"]
    with pytest.raises(AnnotationError, match=r"annotations\[0\].*'category_id'"):
        InstanceDatasetMapper(True, augmentations=[], image_format="RGB")(record)
    record = copy.deepcopy(dicts[0])
    record["annotations"][0]["segmentation"] = {"counts": 5}
    with pytest.raises(AnnotationError, match=r"annotations\[0\].*'segmentation'"):
        InstanceDatasetMapper(True, augmentations=[], image_format="RGB")(record)
    record = copy.deepcopy(dicts[0])
    del record["sem_seg_file_name"]
    with pytest.raises(AnnotationError, match="'sem_seg_file_name'"):
        SemanticDatasetMapper(True, augmentations=[], image_format="RGB")(record)
