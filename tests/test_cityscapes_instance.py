"""Cityscapes instance segmentation on a tiny generated folder in the official layout: the
datasets of Mask2Former's released Cityscapes instance configs, read from instanceIds PNGs
(checked against the hand-written maps), through the instance mapper, and the
`cityscapes_instance` evaluation (official cityscapesscripts) against AP / AP50 computed by
hand for a case with a partial match, a miss, and predictions on a crowd region, on void and
on a ground-truth instance under the benchmark's 100 px minimum."""

from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Instances
from PIL import Image
from pycocotools import mask as mask_util

from openseg.config import add_openseg_config, load_config
from openseg.data.datasets.cityscapes import register_all_cityscapes
from openseg.data.datasets.common import dataset_root
from openseg.data.mappers import build_mapper
from openseg.evaluation.builder import build_evaluator

REPO = Path(__file__).resolve().parents[1]
H, W = 40, 60
PERSON, CAR = 0, 2  # contiguous ids of the 8 thing classes
NAME = "openseg_cityscapes_fine_instance_seg_val"


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def cityscapes(tmp_path):
    """Two val images of city 'lindau'. Image 1: road (7) everywhere, void (0) rows 0-3, car
    26001 = [10:30, 0:20], car 26002 = [10:30, 20:40], person 24001 = [10:30, 45:60] except
    its last column, a car group (26) = [30:40, 0:20], a caravan 29001 (not evaluated)
    = [30:40, 40:50], a 50 px car 26003 = [30:35, 50:60]. Image 2: one person 24001 = [0:20, 0:10]."""
    first = np.full((H, W), 7, np.uint16)
    first[0:4] = 0
    first[10:30, 0:20] = 26001
    first[10:30, 20:40] = 26002
    first[10:30, 45:59] = 24001
    first[30:40, 0:20] = 26
    first[30:40, 40:50] = 29001
    first[30:35, 50:60] = 26003
    second = np.full((H, W), 7, np.uint16)
    second[0:20, 0:10] = 24001
    stems = ["lindau_000000_000019", "lindau_000001_000019"]
    for stem, ids in zip(stems, (first, second)):
        _save(tmp_path / "cityscapes" / "leftImg8bit" / "val" / "lindau" / f"{stem}_leftImg8bit.png",
              np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8))
        _save(tmp_path / "cityscapes" / "gtFine" / "val" / "lindau" / f"{stem}_gtFine_instanceIds.png", ids)
    register_all_cityscapes(tmp_path)
    yield first, second
    register_all_cityscapes(dataset_root())  # the session's registration


def _decode(segmentation):
    return mask_util.decode(dict(segmentation, counts=segmentation["counts"].encode("ascii"))).astype(bool)


def test_instance_dicts_from_instance_ids(cityscapes):
    first, _ = cityscapes
    records = DatasetCatalog.get(NAME)
    assert [r["image_id"] for r in records] == ["lindau_000000_000019", "lindau_000001_000019"]
    assert (records[0]["height"], records[0]["width"]) == (H, W)
    annotations = records[0]["annotations"]
    found = {(a["category_id"], a["iscrowd"]): _decode(a["segmentation"]) for a in annotations}
    assert len(annotations) == 5  # 3 cars, 1 person, 1 car group; the caravan is not evaluated
    assert np.array_equal(found[(PERSON, 0)], first == 24001)
    assert np.array_equal(found[(CAR, 1)], first == 26)
    cars = [a for a in annotations if a["category_id"] == CAR and not a["iscrowd"]]
    assert sorted(a["bbox"] for a in cars) == [[0, 10, 20, 30], [20, 10, 40, 30], [50, 30, 60, 35]]
    meta = MetadataCatalog.get(NAME)
    assert meta.thing_classes == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    assert meta.evaluators == ["cityscapes_instance"]

    cfg = get_cfg()
    add_openseg_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (H,)
    cfg.DATASETS.TRAIN = (NAME,)
    cfg.INPUT.DATASET_MAPPER_NAME = "instance"
    out = build_mapper(cfg, is_train=True)(records[0])
    classes = out["instances"].gt_classes.tolist()
    assert sorted(classes) == [PERSON, CAR, CAR, CAR]  # the crowd region is no target


def test_released_configs_name_registered_datasets(cityscapes):
    for variant in ("maskformer2_R50_bs16_90k", "maskformer2_R101_bs16_90k"):
        cfg = load_config(str(REPO / "configs" / "cityscapes" / "maskformer" / "instance-segmentation" / f"{variant}.yaml"))
        assert cfg.DATASETS.TRAIN == ("openseg_cityscapes_fine_instance_seg_train",)
        assert cfg.DATASETS.TEST == (NAME,)
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == len(MetadataCatalog.get(NAME).thing_classes)


def _prediction(boxes, classes, scores):
    instances = Instances((H, W))
    masks = torch.zeros(len(boxes), H, W, dtype=torch.bool)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        masks[k, y0:y1, x0:x1] = True
    instances.pred_masks = masks
    instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
    instances.scores = torch.tensor(scores)
    return {"instances": instances}


def test_cityscapes_ap_against_hand_computation(cityscapes, tmp_path):
    """Car: p1 = car 26001 exactly (0.9); p2 = car 26002 widened over road to IoU 400 / 572 = 0.699 (0.8):
    a match at overlaps 0.50-0.65 (4 of 10; `overlap > threshold`), else a false positive and
    a miss; p4 inside the car group (0.95), p6 inside the void rows (0.97) and p5 (0.99) on the
    50 px car (ground truth under 100 px is neither counted nor a reason for a false positive)
    are ignored. Per overlap, with the benchmark's step integration (precision at each score
    threshold weighted by half the recall steps on both sides): both matched -> AP 1; one
    match (0.9) above one false positive (0.8), one miss -> points (r, p) = (1/2, 1/2),
    (1/2, 1), (0, 1) -> AP 0.5. Car AP =
    (4 * 1 + 6 * 0.5) / 10 = 0.7, AP50 = 1. Person: image 1 exact (0.6), image 2 missed: recall
    1/2 at precision 1 at every overlap, AP = AP50 = 0.5. Over the classes with ground truth:
    AP = (0.7 + 0.5) / 2 = 0.6, AP50 = (1 + 0.5) / 2 = 0.75."""
    records = DatasetCatalog.get(NAME)
    cfg = get_cfg()
    add_openseg_config(cfg)
    evaluators = build_evaluator(cfg, NAME, str(tmp_path / "eval"))
    evaluators.reset()
    first = _prediction(
        [(10, 30, 0, 20), (4, 30, 20, 42), (10, 30, 45, 59), (30, 40, 0, 20), (0, 4, 0, 60), (30, 35, 50, 60)],
        [CAR, CAR, PERSON, CAR, CAR, CAR],
        [0.9, 0.8, 0.6, 0.95, 0.97, 0.99],
    )
    assert first["instances"].pred_masks[1].sum() == 572
    second = _prediction([], [], [])
    evaluators.process(records, [first, second])
    metrics = evaluators.evaluate()["segm"]
    assert metrics["AP"] == pytest.approx(60.0)
    assert metrics["AP50"] == pytest.approx(75.0)
    assert metrics["AP-car"] == pytest.approx(70.0)
    assert metrics["AP-person"] == pytest.approx(50.0)
    assert np.isnan(metrics["AP-rider"])


def test_panoptic_config_scores_cityscapes_ap_with_19_class_ids(cityscapes, tmp_path):
    """The released panoptic configs report the Cityscapes AP too: on the 19-class panoptic
    dataset (contiguous id = trainId: person 11, car 13) the ground truth is found from the
    image name and the hand case gives the same numbers."""
    cfg = load_config(str(REPO / "configs" / "cityscapes" / "maskformer" / "panoptic-segmentation" / "maskformer2_R50_bs16_90k.yaml"))
    assert list(cfg.TEST.EVALUATORS) == ["panoptic", "semantic", "cityscapes_instance"]
    cfg.TEST.EVALUATORS = ["cityscapes_instance"]
    records = [{k: v for k, v in r.items() if k != "instance_ids_file_name"} for r in DatasetCatalog.get(NAME)]
    evaluators = build_evaluator(cfg, "openseg_cityscapes_fine_panoptic_val", None)
    evaluators.reset()
    first = _prediction(
        [(10, 30, 0, 20), (4, 30, 20, 42), (10, 30, 45, 59), (30, 40, 0, 20), (0, 4, 0, 60), (30, 35, 50, 60)],
        [13, 13, 11, 13, 13, 13],
        [0.9, 0.8, 0.6, 0.95, 0.97, 0.99],
    )
    evaluators.process(records, [first, _prediction([], [], [])])
    metrics = evaluators.evaluate()["segm"]
    assert (metrics["AP"], metrics["AP50"]) == (pytest.approx(60.0), pytest.approx(75.0))


def test_missing_ground_truth_is_named(cityscapes, tmp_path):
    records = DatasetCatalog.get(NAME)
    records[0]["instance_ids_file_name"] = str(tmp_path / "nowhere_gtFine_instanceIds.png")
    cfg = get_cfg()
    add_openseg_config(cfg)
    evaluators = build_evaluator(cfg, NAME, None)
    evaluators.reset()
    evaluators.process(records[:1], [_prediction([], [], [])])
    with pytest.raises(FileNotFoundError, match="nowhere_gtFine_instanceIds.png"):
        evaluators.evaluate()
