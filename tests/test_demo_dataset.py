"""The generated demo dataset: registry round trip, file formats checked with panopticapi and
pycocotools, determinism, and the seen/unseen construction."""

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, SemSegEvaluator
from detectron2.structures import BitMasks, Instances
from demo_utils import demo_registered_at
from panopticapi.evaluation import pq_compute
from panopticapi.utils import rgb2id
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import openseg.data  # noqa: F401  registers the datasets
from openseg.data.datasets.demo import (
    SEED,
    _render,
    _shape_mask,
    generate_demo,
)

# sha256 of the first three renders of each split (test_renders_of_the_demo_splits_are_pinned)
RENDER_DIGEST = "f16ccdd784e25aa8ca9394b99534b7c6ac388f9fe4d1ef5c96d905ddb767cdf9"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """The full demo generated once into a temporary root, registered there; the default
    registration is restored afterwards."""
    root = tmp_path_factory.mktemp("datasets")
    with demo_registered_at(root, "openseg_demo") as (train, val):
        yield root, train, val


def _tree_digest(directory: Path) -> dict:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_round_trip_sizes_and_files(demo_root):
    root, train, val = demo_root
    assert len(train) == 160 and len(val) == 32
    assert (root / "openseg_demo" / "VERSION").is_file()
    image_ids = [d["image_id"] for d in train + val]
    assert len(set(image_ids)) == len(image_ids)
    for record in train + val:
        for key in ("file_name", "pan_seg_file_name", "sem_seg_file_name"):
            assert os.path.isfile(record[key]), record[key]
        assert record["height"] == record["width"] == 128
        assert 2 <= len(record["segments_info"]) <= 7
        things = [s for s in record["segments_info"] if s["isthing"]]
        assert 1 <= len(things) <= 4 and len(things) == len(record["annotations"])
    meta = MetadataCatalog.get("openseg_demo_val")
    assert len(meta.stuff_classes) == 8 and meta.stuff_classes[:4] == meta.thing_classes
    assert [names[0] for names in meta.synonyms] == meta.stuff_classes
    assert meta.class_splits == {"seen": [0, 1, 2, 4, 5, 6], "unseen": [3, 7]}
    for key in ("panoptic_json", "json_file", "panoptic_root", "sem_seg_root", "image_root"):
        assert os.path.exists(getattr(meta, key)), key


def test_unseen_classes_only_in_val(demo_root):
    _, train, val = demo_root
    unseen = set(MetadataCatalog.get("openseg_demo_train").class_splits["unseen"])
    for record in train:
        assert not unseen & {s["category_id"] for s in record["segments_info"]}
        semantic = np.asarray(Image.open(record["sem_seg_file_name"]))
        assert not unseen & set(np.unique(semantic).tolist())
    val_classes = {s["category_id"] for record in val for s in record["segments_info"]}
    assert val_classes == set(range(8))


def test_panoptic_files_consistent_and_pq_perfect(demo_root, tmp_path):
    root, _, val = demo_root
    meta = MetadataCatalog.get("openseg_demo_val")
    panoptic = json.loads(Path(meta.panoptic_json).read_text())
    by_image = {a["image_id"]: a for a in panoptic["annotations"]}
    for record in val:
        annotation = by_image[record["image_id"]]
        pan_ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
        semantic = np.asarray(Image.open(record["sem_seg_file_name"]))
        assert set(np.unique(pan_ids)) == {s["id"] for s in annotation["segments_info"]}
        for raw, loaded in zip(annotation["segments_info"], record["segments_info"]):
            mask = pan_ids == raw["id"]
            assert mask.sum() == raw["area"]
            ys, xs = np.nonzero(mask)
            assert raw["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            ]
            assert loaded["category_id"] == raw["category_id"] - 1  # contiguous
            assert (semantic[mask] == raw["category_id"] - 1).all()
    with contextlib.redirect_stdout(io.StringIO()):
        result = pq_compute(
            meta.panoptic_json, meta.panoptic_json, meta.panoptic_root, meta.panoptic_root
        )
    assert result["All"]["pq"] == pytest.approx(1.0)
    assert result["All"]["n"] == 8


def test_instance_json_loads_and_matches_panoptic(demo_root):
    _, _, val = demo_root
    meta = MetadataCatalog.get("openseg_demo_val")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(meta.json_file)
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4]
    for record in val:
        pan_ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[record["image_id"]]))
        things = [s for s in record["segments_info"] if s["isthing"]]
        assert len(annotations) == len(things)
        for annotation, segment in zip(annotations, things):
            assert annotation["category_id"] - 1 == segment["category_id"]
            assert np.array_equal(coco.annToMask(annotation).astype(bool), pan_ids == segment["id"])
    detections = [{**a, "score": 1.0} for a in coco.loadAnns(coco.getAnnIds())]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(detections), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_generation_is_deterministic_and_versioned(tmp_path):
    first = generate_demo(tmp_path / "a", num_train=5, num_val=3)
    second = generate_demo(tmp_path / "b", num_train=5, num_val=3)
    digest = _tree_digest(first)
    assert digest == _tree_digest(second)
    assert len([name for name in digest if name.startswith("images/")]) == 8
    # an up-to-date copy is kept as it is
    version_mtime = (first / "VERSION").stat().st_mtime_ns
    assert generate_demo(tmp_path / "a", num_train=5, num_val=3) == first
    assert (first / "VERSION").stat().st_mtime_ns == version_mtime
    # a different stamp regenerates in place, with no staging directories left behind
    generate_demo(tmp_path / "a", num_train=2, num_val=3)
    assert len(list((first / "images" / "train").iterdir())) == 2
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["openseg_demo"]
    # the first images do not depend on the split sizes (one seed per image)
    assert (first / "images/val/1000001.jpg").read_bytes() == (
        second / "images/val/1000001.jpg"
    ).read_bytes()
    mask = mask_util.decode(
        json.loads((first / "annotations/instances_val.json").read_text())["annotations"][0][
            "segmentation"
        ]
    )
    assert mask.shape == (128, 128) and mask.any()


def test_renders_of_the_demo_splits_are_pinned():
    """The pixels and segments `_render` gives the first images of each split (before JPEG /
    PNG encoding, so independent of the codecs) are pinned: extending the renderer must leave
    the existing demo data, and the numbers measured on it, unchanged."""
    digest = hashlib.sha256()
    for split_index, split in enumerate(("train", "val")):
        for index in range(3):
            image, segments = _render(np.random.default_rng([SEED, split_index, index]), split)
            digest.update(image.tobytes())
            for name, mask in segments:
                digest.update(name.encode() + np.packbits(mask).tobytes())
    assert digest.hexdigest() == RENDER_DIGEST


@pytest.mark.parametrize(
    "name, area",
    [  # hand-computed areas at radius r
        ("circle", np.pi), ("square", 4.0), ("triangle", 2.0), ("cross", 20 / 9),
        ("ellipse", 0.55 * np.pi), ("diamond", 2.0), ("ring", 0.75 * np.pi),
        ("semicircle", np.pi / 2), ("hexagon", 1.5 * np.sqrt(3)), ("ell", 20 / 9),
        # 5 kites (tip, inner vertex, centre, inner vertex): 10 * (1/2) r * 0.45 r * sin(36°)
        ("star", 2.25 * np.sin(np.pi / 5)),
    ],
)
def test_shape_areas(name, area):
    radius = 50
    mask = _shape_mask(name, 63.5, 63.5, radius, 128)
    assert mask.sum() == pytest.approx(area * radius**2, rel=0.03)


def test_star_and_crescent_geometry():
    star = _shape_mask("star", 64, 64, 40, 128)
    assert star[64 - 38, 64] and not star[64 + 38, 64]  # a tip up, an inner vertex down
    crescent = _shape_mask("crescent", 64, 64, 40, 128)
    assert crescent[64, 64 - 38] and not crescent[64, 64] and not crescent[64, 64 + 38]


def test_detectron2_evaluators_score_ground_truth_perfectly(demo_root):
    """The metadata and files are what detectron2's evaluators need: ground truth fed back as
    predictions scores PQ = mIoU = AP = 100."""
    _, _, val = demo_root
    name = "openseg_demo_val"
    evaluators = [
        COCOPanopticEvaluator(name),
        SemSegEvaluator(name, distributed=False),
        COCOEvaluator(name, tasks=("segm",), distributed=False, use_fast_impl=False),
    ]
    for evaluator in evaluators:
        evaluator.reset()
    for record in val:
        pan_ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
        semantic = torch.as_tensor(
            np.asarray(Image.open(record["sem_seg_file_name"])).astype(np.int64)
        )
        things = [s for s in record["segments_info"] if s["isthing"]]
        masks = torch.as_tensor(np.stack([pan_ids == s["id"] for s in things]))
        instances = Instances((128, 128))
        instances.pred_masks = masks
        instances.pred_boxes = BitMasks(masks).get_bounding_boxes()
        instances.scores = torch.ones(len(things))
        instances.pred_classes = torch.tensor([s["category_id"] for s in things])
        segments = [
            {"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]}
            for s in record["segments_info"]
        ]
        output = {
            "panoptic_seg": (torch.as_tensor(pan_ids), segments),
            "sem_seg": torch.nn.functional.one_hot(semantic, 8).permute(2, 0, 1).float(),
            "instances": instances,
        }
        for evaluator in evaluators:
            evaluator.process([record], [output])
    with contextlib.redirect_stdout(io.StringIO()):
        panoptic, semantic, instance = [evaluator.evaluate() for evaluator in evaluators]
    assert panoptic["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert semantic["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert instance["segm"]["AP"] == pytest.approx(100.0)
