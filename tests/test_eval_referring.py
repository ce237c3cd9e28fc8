"""Referring segmentation: cIoU / mIoU / Prec@X against hand-computed values, the referring
mapper on a synthetic RefCOCO-style dict, and the evaluator family registration."""
import json

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from PIL import Image

from openseg.config import add_openseg_config
from openseg.data.mappers import AnnotationError, build_mapper
from openseg.evaluation.builder import build_evaluator
from openseg.evaluation.referring import ReferringEvaluator, referring_metrics

DATASET = "openseg_test_referring_tiny"


@pytest.fixture(scope="module", autouse=True)
def tiny_metadata():
    if DATASET in MetadataCatalog.list():
        MetadataCatalog.remove(DATASET)
    MetadataCatalog.get(DATASET).set(
        thing_classes=["person", "dog"], stuff_classes=["person", "dog"], evaluators=["referring"]
    )
    yield
    MetadataCatalog.remove(DATASET)


def _mask(height, width, rows, cols):
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def hand_case():
    """Image 1 (4x4): target = 2x2 block at the top left (4 px).
        sentence a: prediction = top row, 4 px -> I = 2, U = 6
        sentence b: prediction = target        -> I = 4, U = 4
    Image 2 (3x5): target = middle row (5 px).
        sentence c: empty prediction           -> I = 0, U = 5
    cIoU = (2 + 4 + 0) / (6 + 4 + 5) = 6 / 15; mIoU = (1/3 + 1 + 0) / 3 = 4 / 9;
    Prec@0.5 = 1/3 (only b), Prec@0.9 = 1/3."""
    target_1 = _mask(4, 4, slice(0, 2), slice(0, 2))
    pred_a = _mask(4, 4, slice(0, 1), slice(0, 4))
    target_2 = _mask(3, 5, slice(1, 2), slice(0, 5))
    inputs = [
        {"image_id": 1, "ref_id": 10, "sentences": ["a", "b"], "gt_mask": target_1},
        {"image_id": 2, "ref_id": 11, "sentences": ["c"], "gt_mask": target_2},
    ]
    outputs = [
        {"ref_seg": torch.stack([pred_a, target_1])},
        {"ref_seg": torch.zeros(1, 3, 5, dtype=torch.bool)},
    ]
    return inputs, outputs


def test_hand_computed_ciou_and_miou(tmp_path):
    inputs, outputs = hand_case()
    evaluator = ReferringEvaluator(DATASET, output_dir=str(tmp_path), distributed=False)
    evaluator.reset()
    evaluator.process(inputs[:1], outputs[:1])
    evaluator.process(inputs[1:], outputs[1:])
    metrics = evaluator.evaluate()["referring"]
    assert metrics["cIoU"] == pytest.approx(100 * 6 / 15)
    assert metrics["mIoU"] == pytest.approx(100 * 4 / 9)
    assert metrics["Prec@0.5"] == pytest.approx(100 / 3)
    assert metrics["Prec@0.9"] == pytest.approx(100 / 3)
    assert metrics["num_expressions"] == 3
    saved = json.loads((tmp_path / "referring_metrics.json").read_text())
    assert saved["cIoU"] == pytest.approx(40.0)
    raw = (tmp_path / "referring_raw" / "rank0.jsonl").read_text().splitlines()
    assert json.loads(raw[0])["intersection"] == [2, 4]
    assert json.loads(raw[0])["union"] == [6, 4]


def test_metrics_match_brute_force_on_random_masks():
    rng = np.random.default_rng(0)
    predictions = rng.random((20, 9, 7)) > 0.5
    targets = rng.random((20, 9, 7)) > 0.6
    intersections, unions, ious = [], [], []
    for p, t in zip(predictions, targets):
        i = sum(int(a and b) for a, b in zip(p.ravel(), t.ravel()))
        u = sum(int(a or b) for a, b in zip(p.ravel(), t.ravel()))
        intersections.append(i)
        unions.append(u)
        ious.append(i / u)
    metrics = referring_metrics(np.array(intersections), np.array(unions))
    assert metrics["cIoU"] == pytest.approx(100 * sum(intersections) / sum(unions))
    assert metrics["mIoU"] == pytest.approx(100 * np.mean(ious))
    assert metrics["Prec@0.7"] == pytest.approx(100 * np.mean(np.array(ious) > 0.7))


def test_errors_name_the_problem():
    inputs, outputs = hand_case()
    evaluator = ReferringEvaluator(DATASET, distributed=False)
    evaluator.reset()
    with pytest.raises(KeyError, match="gt_mask"):
        evaluator.process([{"image_id": 1, "sentences": ["a"]}], outputs[:1])
    with pytest.raises(KeyError, match="ref_seg"):
        evaluator.process(inputs[:1], [{"sem_seg": None}])
    with pytest.raises(ValueError, match="sentences"):
        evaluator.process(inputs[:1], [{"ref_seg": outputs[0]["ref_seg"][:1]}])
    with pytest.raises(ValueError, match="height x width"):
        evaluator.process(inputs[:1], [{"ref_seg": torch.zeros(2, 5, 5, dtype=torch.bool)}])


def test_family_is_built_from_metadata():
    cfg = get_cfg()
    add_openseg_config(cfg)
    evaluators = build_evaluator(cfg, DATASET)
    assert [type(e).__name__ for e in evaluators._evaluators] == ["ReferringEvaluator"]


def test_referring_mapper(tmp_path):
    image_file = tmp_path / "image.png"
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(image_file)
    record = {
        "file_name": str(image_file), "height": 20, "width": 40, "image_id": 7, "ref_id": 3,
        "sentences": ["the box on the left"],
        # polygon of the rectangle x in [0, 10], y in [0, 10] (pycocotools fills 10x10 px)
        "annotations": [{"segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]], "category_id": 1,
                         "iscrowd": 0, "bbox": [0, 0, 10, 10], "bbox_mode": 1}],
    }
    cfg = get_cfg()
    add_openseg_config(cfg)
    cfg.INPUT.DATASET_MAPPER_NAME = "referring"
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (40,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.MIN_SIZE_TEST = 40
    cfg.INPUT.MAX_SIZE_TEST = 1000
    test_out = build_mapper(cfg, is_train=False)(record)
    assert test_out["image"].shape == (3, 40, 80)
    assert test_out["sentences"] == ["the box on the left"]
    assert test_out["gt_mask"].shape == (20, 40)
    assert test_out["gt_mask"].sum() == 100 and test_out["gt_mask"][:10, :10].all()
    assert "annotations" not in test_out and "annotations" in record
    train_out = build_mapper(cfg, is_train=True)(record)
    instances = train_out["instances"]
    assert instances.gt_classes.tolist() == [1]
    assert instances.gt_masks.shape == (1, 40, 80)
    assert instances.gt_masks[0].sum() == 400 and instances.gt_masks[0, :20, :20].all()
    with pytest.raises(AnnotationError, match="sentences"):
        build_mapper(cfg, is_train=False)({k: v for k, v in record.items() if k != "sentences"})
