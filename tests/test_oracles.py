"""Ground-truth oracles: each one's defining property, against brute-force references."""

import itertools
import math
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.structures import Instances

from openseg.config import load_config
from openseg.data.mappers import build_mapper
from openseg.engine import Trainer
from openseg.evaluation.panoptic import PanopticEvaluator
from openseg.modeling.oracles import (
    OracleSwitches,
    apply_oracles,
    ground_truth_of_input,
    match_masks,
    oracle_combinations,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo", "maskformer_R18.yaml")


def random_case(seed=0, queries=6, targets=3, classes=4, size=8):
    generator = torch.Generator().manual_seed(seed)
    mask_cls = torch.randn(queries, classes + 1, generator=generator)
    mask_pred = 3 * torch.randn(queries, size, size, generator=generator)
    gt_labels = torch.randint(0, classes, (targets,), generator=generator)
    gt_masks = torch.rand(targets, size, size, generator=generator) > 0.5
    return mask_cls, mask_pred, gt_labels, gt_masks


def no_classifier(masks):
    raise AssertionError("classify_masks must not be called")


def brute_force_iou(a, b):
    a, b = a.numpy().astype(bool), b.numpy().astype(bool)
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 0.0


def test_classification_oracle_gives_gt_class_to_every_mask_with_iou_above_half():
    torch.manual_seed(0)
    mask_cls, mask_pred, gt_labels, gt_masks = random_case(queries=12, size=6)
    # make some queries near-copies of ground-truth masks so both cases occur
    mask_pred[0] = torch.where(gt_masks[1], 4.0, -4.0)
    mask_pred[1] = torch.where(gt_masks[2], 4.0, -4.0)
    mask_pred[1, 0, :3] *= -1
    switches = OracleSwitches(classification=True)
    new_cls, new_pred = apply_oracles(
        switches, mask_cls, mask_pred, gt_labels, gt_masks, (6, 6), no_classifier
    )
    torch.testing.assert_close(new_pred, mask_pred)
    hits = 0
    for q in range(mask_cls.shape[0]):
        ious = [brute_force_iou(mask_pred[q] > 0, gt_masks[j]) for j in range(len(gt_labels))]
        best = int(np.argmax(ious))
        old_probs, new_probs = mask_cls[q].softmax(-1), new_cls[q].softmax(-1)
        if ious[best] > 0.5:
            hits += 1
            assert int(new_probs[:-1].argmax()) == int(gt_labels[best])
            assert math.isclose(float(new_probs[:-1].sum()), 1 - float(old_probs[-1]), abs_tol=1e-5)
            assert math.isclose(float(new_probs[-1]), float(old_probs[-1]), abs_tol=1e-5)
        else:
            torch.testing.assert_close(new_cls[q], mask_cls[q])
    assert hits >= 2


def naive_mask_cost(pred_logits, target):
    """Mean BCE + dice over all pixels, from the formulas."""
    p = 1 / (1 + np.exp(-pred_logits.numpy().ravel().astype(np.float64)))
    t = target.numpy().ravel().astype(np.float64)
    bce = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return 5 * bce + 5 * dice


def test_mask_selection_keeps_exactly_the_optimal_assignment():
    mask_cls, mask_pred, gt_labels, gt_masks = random_case(seed=3, queries=5, targets=3)
    cost = np.array([[naive_mask_cost(mask_pred[q], gt_masks[j]) for j in range(3)] for q in range(5)])
    best = min(itertools.permutations(range(5), 3), key=lambda qs: sum(cost[q, j] for j, q in enumerate(qs)))
    query_index, gt_index = match_masks(mask_pred, gt_masks, (8, 8))
    assert {(int(q), int(j)) for q, j in zip(query_index, gt_index)} == {(q, j) for j, q in enumerate(best)}

    new_cls, new_pred = apply_oracles(
        OracleSwitches(mask_selection=True), mask_cls, mask_pred, gt_labels, gt_masks, (8, 8),
        no_classifier,
    )
    kept = sorted(best)
    torch.testing.assert_close(new_pred, mask_pred[kept])
    probs = new_cls.softmax(-1)
    assert torch.all(probs[:, -1] < 1e-6)
    torch.testing.assert_close(probs[:, :-1], mask_cls[kept, :-1].softmax(-1), atol=1e-5, rtol=1e-5)

    # + segmentation: the kept queries' masks become their matched ground truth
    _, seg_pred = apply_oracles(
        OracleSwitches(mask_selection=True, segmentation=True), mask_cls, mask_pred, gt_labels,
        gt_masks, (8, 8), no_classifier,
    )
    for row, q in enumerate(kept):
        assert torch.equal(seg_pred[row] > 0, gt_masks[best.index(q)])


def test_drop_no_object_renormalises_over_classes():
    mask_cls, mask_pred, gt_labels, gt_masks = random_case()
    new_cls, _ = apply_oracles(
        OracleSwitches(drop_no_object=True), mask_cls, mask_pred, gt_labels, gt_masks, (8, 8),
        no_classifier,
    )
    probs = new_cls.softmax(-1)
    expected = np.exp(mask_cls[:, :-1].numpy())
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(probs[:, :-1].numpy(), expected, atol=1e-6)
    assert float(probs[:, -1].max()) < 1e-6


def test_segmentation_oracle_uses_gt_masks_and_the_models_mask_classifier():
    mask_cls, mask_pred, gt_labels, gt_masks = random_case()
    seen = []

    def classifier(masks):
        seen.append(masks)
        return torch.arange(3 * 5, dtype=torch.float32).view(3, 5)

    new_cls, new_pred = apply_oracles(
        OracleSwitches(segmentation=True), mask_cls, mask_pred, gt_labels, gt_masks, (8, 8),
        classifier,
    )
    assert torch.equal(seen[0], gt_masks)
    assert torch.equal(new_pred > 0, gt_masks) and torch.all(new_pred.abs() >= 10)
    torch.testing.assert_close(new_cls[:, :4], torch.arange(15, dtype=torch.float32).view(3, 5)[:, :4])
    assert float(new_cls.softmax(-1)[:, -1].max()) < 1e-6  # ground truth is never no-object


def test_oracle_without_ground_truth_and_bad_labels_fail_clearly():
    with pytest.raises(KeyError, match="instances"):
        ground_truth_of_input({"image": torch.zeros(3, 4, 4)}, (4, 4), torch.device("cpu"))
    mask_cls, mask_pred, _, gt_masks = random_case(classes=4)
    with pytest.raises(ValueError, match="class 7"):
        apply_oracles(
            OracleSwitches(classification=True), mask_cls, mask_pred, torch.tensor([0, 1, 7]),
            gt_masks, (8, 8), no_classifier,
        )
    assert [s.name for s in oracle_combinations()][:2] == ["none", "drop_no_object"]


def demo_cfg(*opts):
    return load_config(
        DEMO_CONFIG,
        ["DATALOADER.NUM_WORKERS", "0", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "4",
         "MODEL.MASK_FORMER.DEC_LAYERS", "2", *opts],
    )


def test_test_mapper_keeps_ground_truth_only_under_an_oracle():
    record = DatasetCatalog.get("openseg_demo_val")[0]
    plain = build_mapper(demo_cfg(), is_train=False)(record)
    assert "instances" not in plain
    kept = build_mapper(demo_cfg("TEST.ORACLE.CLASSIFICATION", "True"), is_train=False)(record)
    assert isinstance(kept["instances"], Instances)
    assert kept["instances"].gt_masks.shape[-2:] == kept["image"].shape[-2:] == (128, 128)
    assert len(kept["instances"]) == len(record["segments_info"])


def test_segmentation_oracle_keeps_every_ground_truth_segment():
    """Random weights give low-confidence classes; the oracle still decides which masks exist."""
    torch.manual_seed(0)
    cfg = demo_cfg("TEST.ORACLE.SEGMENTATION", "True")
    model = build_model(cfg).eval()
    mapper = build_mapper(cfg, is_train=False)
    records = DatasetCatalog.get("openseg_demo_val")[:2]
    with torch.no_grad():
        outputs = model([mapper(r) for r in records])
    for record, output in zip(records, outputs):
        from panopticapi.utils import rgb2id
        from PIL import Image

        gt_ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
        labelled = np.isin(gt_ids, [s["id"] for s in record["segments_info"]])
        id_map = output["panoptic_seg"][0].numpy()
        assert (id_map[labelled] > 0).all()
        for segment in record["segments_info"]:  # each segment lies inside one predicted segment
            assert len(np.unique(id_map[gt_ids == segment["id"]])) == 1


def test_segmentation_oracle_with_perfect_classifier_gives_pq_100_on_demo_data(tmp_path):
    torch.manual_seed(0)
    cfg = demo_cfg(
        "TEST.ORACLE.SEGMENTATION", "True", "TEST.ORACLE.CLASSIFICATION", "True",
        "OUTPUT_DIR", str(tmp_path),
    )
    model = build_model(cfg).eval()  # random weights: everything comes from the oracles
    loader = Trainer.build_test_loader(cfg, "openseg_demo_val")
    evaluator = PanopticEvaluator("openseg_demo_val", str(tmp_path), distributed=False)
    results = inference_on_dataset(model, loader, evaluator)["panoptic_seg"]
    assert results["PQ"] == pytest.approx(100.0)
    assert results["PQ_unseen"] == pytest.approx(100.0)


def load_oracle_study():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "oracle_study", os.path.join(ROOT, "tools", "oracle_study.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_oracle_study_tables_and_plot(tmp_path):
    study = load_oracle_study()
    per_class = [
        {"name": "a", "splits": ["seen"], "PQ": 0.5, "TP": 3, "FN": 1, "FN_seg": 1, "FN_cls": 0},
        {"name": "b", "splits": ["unseen"], "PQ": 0.1, "TP": 0, "FN": 4, "FN_seg": 1, "FN_cls": 3},
        {"name": "c", "splits": ["seen"], "PQ": 0.2, "TP": 1, "FN": 4, "FN_seg": 4, "FN_cls": 0},
    ]
    assert [row["class"] for row in study.worst_classes(per_class, 2)] == ["b", "c"]
    cfg = study.with_oracles(demo_cfg(), OracleSwitches(mask_selection=True, classification=True))
    assert (cfg.TEST.ORACLE.MASK_SELECTION, cfg.TEST.ORACLE.CLASSIFICATION) == (True, True)
    assert not cfg.TEST.ORACLE.SEGMENTATION
    rows = [{"variant": "none", "PQ": 10.0, "PQ_seen": 12.0, "PQ_unseen": float("nan")}]
    assert "| none" in study.markdown_table(rows)
    study.bar_plot(rows, str(tmp_path / "plot.png"), "test")
    assert (tmp_path / "plot.png").stat().st_size > 1000
