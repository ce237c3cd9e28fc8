"""SemanticEvaluator against detectron2's SemSegEvaluator and hand-computed split metrics, on
generated semantic ground truth PNGs."""

import json
import math
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from PIL import Image

from openseg.evaluation.semantic import SemanticEvaluator

CLASS_NAMES = ["wall", "floor", "tree", "sky", "person", "car"]
NUM_CLASSES = len(CLASS_NAMES)
IGNORE = 255
SPLITS = {"seen": [0, 1, 2, 3], "unseen": [4, 5]}


def _register(name, records):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(
        stuff_classes=CLASS_NAMES,
        ignore_label=IGNORE,
        class_splits=SPLITS,
        evaluators=["semantic"],
    )


def make_case(tmp_path, seed, num_images=6, h=20, w=28):
    """Random GT (with ignore pixels; image 1 all ignore; class 5 never in GT) and C x H x W
    scores whose argmax mostly agrees with the GT."""
    rng = np.random.RandomState(seed)
    torch.manual_seed(seed)
    records, inputs, outputs = [], [], []
    for i in range(num_images):
        gt = rng.randint(0, NUM_CLASSES - 1, size=(h, w))
        gt[rng.rand(h, w) < 0.1] = IGNORE
        if i == 1:
            gt[:] = IGNORE
        gt_file = tmp_path / f"{i}.png"
        Image.fromarray(gt.astype(np.uint8)).save(gt_file)
        file_name = str(tmp_path / f"{i}.jpg")
        records.append(
            {
                "file_name": file_name,
                "sem_seg_file_name": str(gt_file),
                "height": h,
                "width": w,
                "image_id": i,
            }
        )
        scores = torch.rand(NUM_CLASSES, h, w)
        target = torch.from_numpy(np.where(gt == IGNORE, 0, gt))
        agree = torch.rand(h, w) < 0.6
        scores[target[agree], agree.nonzero()[:, 0], agree.nonzero()[:, 1]] += 1.0
        inputs.append({"file_name": file_name, "image_id": i})
        outputs.append({"sem_seg": scores})
    name = f"test_semantic_{seed}_{os.getpid()}"
    _register(name, records)
    return name, inputs, outputs


def _run(evaluator, inputs, outputs, batch=4):
    evaluator.reset()
    for start in range(0, len(inputs), batch):
        evaluator.process(inputs[start : start + batch], outputs[start : start + batch])
    return evaluator.evaluate()["sem_seg"]


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_detectron2_sem_seg_evaluator(tmp_path, seed):
    name, inputs, outputs = make_case(tmp_path, seed)
    ours = _run(
        SemanticEvaluator(name, output_dir=str(tmp_path / "out"), distributed=False),
        inputs,
        outputs,
    )
    reference = _run(SemSegEvaluator(name, distributed=False), inputs, outputs)
    shared = [k for k in reference if k in ours]
    assert {"mIoU", "fwIoU", "mACC", "pACC", "IoU-car", "ACC-wall"} <= set(shared)
    assert len(shared) == 4 + 2 * NUM_CLASSES
    for key in shared:
        assert _same(ours[key], reference[key]), (key, ours[key], reference[key])
    assert math.isnan(ours["IoU-car"])  # no ground truth of class 5

    # split columns, from the reference's per-class numbers
    for split, ids in SPLITS.items():
        ious = [reference[f"IoU-{CLASS_NAMES[i]}"] for i in ids]
        ious = [v for v in ious if not math.isnan(v)]
        assert ours[f"mIoU_{split}"] == pytest.approx(np.mean(ious), abs=1e-6)
        accs = [reference[f"ACC-{CLASS_NAMES[i]}"] for i in ids]
        accs = [v for v in accs if not math.isnan(v)]
        assert ours[f"mACC_{split}"] == pytest.approx(np.mean(accs), abs=1e-6)


def test_split_pixel_accuracy_and_fwiou_by_hand(tmp_path):
    """2 x 3 image: GT [[0, 0, 4], [4, 1, 255]], prediction [[0, 1, 4], [0, 1, 2]]."""
    gt = np.array([[0, 0, 4], [4, 1, IGNORE]], np.uint8)
    Image.fromarray(gt).save(tmp_path / "gt.png")
    name = f"test_semantic_hand_{os.getpid()}"
    _register(name, [{"file_name": "a.jpg", "sem_seg_file_name": str(tmp_path / "gt.png")}])
    pred = torch.tensor([[0, 1, 4], [0, 1, 2]])
    result = _run(
        SemanticEvaluator(name, distributed=False), [{"file_name": "a.jpg"}], [{"sem_seg": pred}]
    )
    # class 0: tp 1, gt 2, pred 2 -> IoU 1/3; class 1: tp 1, gt 1, pred 2 -> IoU 1/2;
    # class 4: tp 1, gt 2, pred 1 -> IoU 1/2; class 2 predicted only on an ignored pixel
    assert result["IoU-wall"] == pytest.approx(100 / 3)
    assert result["mIoU"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert result["pACC"] == pytest.approx(100 * 3 / 5)
    assert result["pACC_seen"] == pytest.approx(100 * 2 / 3)
    assert result["fwIoU_seen"] == pytest.approx(100 * (2 * (1 / 3) + 1 * (1 / 2)) / 3)
    assert result["mIoU_unseen"] == pytest.approx(50)
    assert result["mACC_unseen"] == pytest.approx(50)


def test_all_ignore_ground_truth_contributes_nothing(tmp_path):
    name, inputs, outputs = make_case(tmp_path, seed=3, num_images=3)
    evaluator = SemanticEvaluator(name, distributed=False)
    with_empty = _run(evaluator, inputs, outputs)
    without_empty = _run(evaluator, [inputs[0], inputs[2]], [outputs[0], outputs[2]])
    for key, value in with_empty.items():
        assert _same(value, without_empty[key]), key


def test_raw_records_and_metrics_json(tmp_path):
    name, inputs, outputs = make_case(tmp_path, seed=4, num_images=3)
    out = tmp_path / "out"
    result = _run(SemanticEvaluator(name, output_dir=str(out), distributed=False), inputs, outputs)
    lines = (out / "sem_seg_raw" / "rank0.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["labelled_pixels"] == 0
    saved = json.loads((out / "sem_seg_metrics.json").read_text())
    intersection = np.zeros(NUM_CLASSES, int)
    for line in lines:
        record = json.loads(line)
        assert sum(record["gt_pixels"]) == record["labelled_pixels"]
        np.add.at(intersection, record["class_ids"], record["intersection"])
    assert intersection.tolist() == np.diagonal(saved["confusion"]).tolist()
    assert saved["summary"]["mIoU"] == pytest.approx(result["mIoU"])


def test_bad_predictions_raise(tmp_path):
    name, inputs, outputs = make_case(tmp_path, seed=5, num_images=1)
    evaluator = SemanticEvaluator(name, distributed=False)
    evaluator.reset()
    cases = [
        (torch.rand(NUM_CLASSES + 1, 20, 28), "7 score channels"),
        (torch.full((20, 28), NUM_CLASSES), f"class id {NUM_CLASSES}"),
        (torch.full((20, 28), -1), "class id -1"),
        (torch.rand(NUM_CLASSES, 20, 27), r"\(20, 27\).*\(20, 28\)"),
        (torch.zeros(20, 27, dtype=torch.long), r"\(20, 27\).*\(20, 28\)"),
    ]
    for sem_seg, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            evaluator.process(inputs, [{"sem_seg": sem_seg}])
        assert "0.jpg" in str(error.value)
    with pytest.raises(ValueError, match="missing.jpg"):
        evaluator.process([{"file_name": "missing.jpg"}], outputs)


def test_bad_ground_truth_and_arguments_raise(tmp_path):
    Image.fromarray(np.full((2, 2), 9, np.uint8)).save(tmp_path / "gt.png")
    name = f"test_semantic_badgt_{os.getpid()}"
    _register(name, [{"file_name": "a.jpg", "sem_seg_file_name": str(tmp_path / "gt.png")}])
    evaluator = SemanticEvaluator(name, distributed=False)
    evaluator.reset()
    with pytest.raises(ValueError, match="gt.png.*label 9"):
        evaluator.process([{"file_name": "a.jpg"}], [{"sem_seg": torch.zeros(2, 2).long()}])
    with pytest.raises(ValueError, match="num_classes=3"):
        SemanticEvaluator(name, num_classes=3)
