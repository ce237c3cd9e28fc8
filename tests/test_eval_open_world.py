"""OpenWorldAREvaluator against a brute-force pycocotools reference: one COCOeval per class
with the class-agnostic predictions relabelled to that class, and one COCOeval with all
ground truth merged into a single category for the class-agnostic AP@100 / AR@100."""

import contextlib
import io
import json
import math
import os

import numpy as np
import pytest
from pycocotools.coco import COCO
from test_eval_instance import (
    CLASS_SPLITS,
    DATASET_CATEGORY_IDS,
    coco_results,
    empty_predictions,
    make_synthetic_dataset,
    model_outputs,
    quiet_coco_eval,
    random_box_mask,
    random_predictions,
    run_evaluator,
)

from openseg.evaluation.instance import InstanceSegEvaluator
from openseg.evaluation.open_world import IOU_THRESHOLDS, OpenWorldAREvaluator, greedy_match

AREA_KEYS = {"AR_all": 0, "AR_s": 1, "AR_m": 2, "AR_l": 3}  # COCOeval areaRng order


def reference_coco(json_file, merge_classes: bool = False) -> COCO:
    """pycocotools index of the GT; LVIS files get COCOeval's required `iscrowd` (0), and
    with `merge_classes` every annotation becomes category 1."""
    data = json.load(open(json_file))
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
        if merge_classes:
            ann["category_id"] = 1
    if merge_classes:
        data["categories"] = [{"id": 1, "name": "object"}]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = data
        coco_gt.createIndex()
    return coco_gt


def brute_force_class_ar(json_file, predictions, image_ids):
    """{category_id: [AR per area all/s/m/l, NaN where the class has no GT]} in percent."""
    coco_gt = reference_coco(json_file)
    per_class = {}
    for category_id in DATASET_CATEGORY_IDS:
        results = coco_results(predictions, category_of=lambda _: category_id)
        coco_eval = quiet_coco_eval(
            coco_gt, results, image_ids, catIds=[category_id], maxDets=[100]
        )
        recall = coco_eval.eval["recall"]  # [IoU, class, area, maxDets]
        per_class[category_id] = [
            100 * recall[:, 0, a, 0].mean() if (recall[:, 0, a, 0] > -1).all() else math.nan
            for a in range(4)
        ]
    return per_class


def brute_force_agnostic(json_file, predictions, image_ids):
    """COCOeval (AP, AR@100) in percent with all ground truth in one category."""
    coco_gt = reference_coco(json_file, merge_classes=True)
    results = coco_results(predictions, category_of=lambda _: 1)
    stats = quiet_coco_eval(coco_gt, results, image_ids).stats
    return 100 * stats[0], 100 * stats[8]


def _nanmean(values):
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


@pytest.mark.parametrize("seed, lvis", [(0, False), (1, False), (2, False), (3, False), (4, True)])
def test_class_wise_ar_matches_per_class_cocoeval(tmp_path, seed, lvis):
    name = f"ow_{seed}"
    json_file, dataset_dicts, gt_by_image = make_synthetic_dataset(tmp_path, name, seed, lvis=lvis)
    rng = np.random.default_rng(seed + 20)
    predictions = random_predictions(rng, dataset_dicts, gt_by_image)
    # evaluate a subset of the images on one seed: GT of unprocessed images must not count
    if seed == 3:
        dataset_dicts = dataset_dicts[1:]
        predictions = {d["image_id"]: predictions[d["image_id"]] for d in dataset_dicts}
    image_ids = sorted(d["image_id"] for d in dataset_dicts)
    metrics = run_evaluator(
        OpenWorldAREvaluator(name, output_dir=str(tmp_path), distributed=False),
        dataset_dicts,
        predictions,
    )

    per_class = brute_force_class_ar(json_file, predictions, image_ids)
    for key, area in AREA_KEYS.items():
        expected = _nanmean([ar[area] for ar in per_class.values()])
        assert metrics[key] == pytest.approx(expected, abs=1e-6, nan_ok=True), key
    for split_name, ids in CLASS_SPLITS.items():
        expected = _nanmean([per_class[DATASET_CATEGORY_IDS[c]][0] for c in ids])
        assert metrics[f"AR_{split_name}"] == pytest.approx(expected, abs=1e-6, nan_ok=True)
    for category_id, ar in per_class.items():
        assert metrics[f"AR-class{category_id}"] == pytest.approx(ar[0], abs=1e-6, nan_ok=True)
    assert math.isnan(metrics[f"AR-class{DATASET_CATEGORY_IDS[-1]}"])
    assert 0 < metrics["AR_all"] < 100

    ap, ar = brute_force_agnostic(json_file, predictions, image_ids)
    assert metrics["AP@100"] == pytest.approx(ap, abs=1e-6)
    assert metrics["AR@100"] == pytest.approx(ar, abs=1e-6)

    saved = json.load(open(os.path.join(str(tmp_path), "open_world_metrics.json")))
    assert saved["AR_all"] == pytest.approx(metrics["AR_all"])
    raw = open(os.path.join(str(tmp_path), "open_world_raw", "rank0.jsonl")).read().splitlines()
    assert sorted(json.loads(line)["image_id"] for line in raw) == image_ids


def test_only_top_max_dets_predictions_count(tmp_path):
    json_file, dataset_dicts, gt_by_image = make_synthetic_dataset(tmp_path, "ow_top", 7)
    rng = np.random.default_rng(0)
    predictions = {}
    for d in dataset_dicts:
        height, width = d["height"], d["width"]
        exact = [m for m, _, crowd in gt_by_image[d["image_id"]] if not crowd]
        # 110 high-scoring masks in the image's corner pixel (IoU < 0.5 with every GT box,
        # which have >= 4 px sides) and the exact GT masks ranked below them
        junk = np.zeros((110, height, width), bool)
        junk[:, 0, 0] = True
        masks = np.concatenate([junk, np.stack(exact)]) if exact else junk
        scores = np.concatenate([0.5 + 0.4 * rng.random(110), 0.1 * rng.random(len(exact))])
        predictions[d["image_id"]] = (masks, scores.astype(np.float32), np.zeros(len(masks), int))
    image_ids = sorted(gt_by_image)

    metrics = run_evaluator(
        OpenWorldAREvaluator("ow_top", distributed=False), dataset_dicts, predictions
    )
    assert metrics["AR_all"] == 0.0 and metrics["AR@100"] == 0.0
    per_class = brute_force_class_ar(json_file, predictions, image_ids)
    assert _nanmean([ar[0] for ar in per_class.values()]) == 0.0

    metrics = run_evaluator(
        OpenWorldAREvaluator("ow_top", distributed=False, max_dets=200), dataset_dicts, predictions
    )
    assert metrics["AR_all"] == pytest.approx(100.0)
    assert metrics["AR@200"] == pytest.approx(100.0)


def test_empty_predictions_and_bad_input(tmp_path):
    _, dataset_dicts, _ = make_synthetic_dataset(tmp_path, "ow_empty", 8)
    metrics = run_evaluator(
        OpenWorldAREvaluator("ow_empty", distributed=False),
        dataset_dicts,
        empty_predictions(dataset_dicts),
    )
    assert metrics["AR_all"] == 0.0 and metrics["AP@100"] == 0.0 and metrics["AR_unseen"] == 0.0

    d = dataset_dicts[0]
    mask = random_box_mask(np.random.default_rng(0), d["height"], d["width"] - 1)[None]
    outputs = model_outputs([d], {d["image_id"]: (mask, np.ones(1, np.float32), [0])})
    evaluator = OpenWorldAREvaluator("ow_empty", distributed=False)
    evaluator.reset()
    with pytest.raises(ValueError, match=r"img100\.jpg.*\(128, 119\).*\(128, 120\)"):
        evaluator.process([d], outputs)
    with pytest.raises(ValueError, match="max_dets"):
        OpenWorldAREvaluator("ow_empty", distributed=False, max_dets=0)


def test_greedy_match_hand_computed_cases():
    no_crowd = np.zeros(2, bool)
    kept = np.zeros((1, 2), bool)
    # a tie in IoU goes to the later GT (COCO keeps the last best), which frees GT 0 for det 1
    ious = np.array([[0.62, 0.62], [0.92, 0.0]])
    gt_matched, det_match = greedy_match(ious, no_crowd, kept, np.array([0]))
    low = IOU_THRESHOLDS < 0.62
    assert (gt_matched[0, :, 0] == (IOU_THRESHOLDS < 0.92)).all()
    assert (gt_matched[0, :, 1] == low).all()
    assert (det_match[0, low, 0, 0] == 1).all() and (det_match[0, ~low, 0, 0] == -1).all()

    # two groups match independently: the same detection takes one GT in each
    gt_matched, det_match = greedy_match(ious, no_crowd, kept, np.array([0, 1]))
    assert gt_matched[0, 0].all() and (det_match[0, 0, :, 0] == [0, 1]).all()

    # a crowd (ignored) GT is taken only when no kept GT qualifies, and by any number of dets
    crowd = np.array([False, True])
    ious = np.array([[0.55, 0.97], [0.3, 0.97], [0.3, 0.4]])
    gt_matched, det_match = greedy_match(ious, crowd, crowd[None], np.array([0]))
    assert (det_match[0, 0, 0] == [0, 1, -1]).all()  # IoU 0.5: det 0 prefers the kept GT
    assert (det_match[0, -1, 0] == [1, 1, -1]).all()  # IoU 0.95: both take the crowd


def _ddp_worker(tmp_dir: str) -> None:
    """Evaluate each rank's half of the images with both instance evaluators; rank 0 saves."""
    from detectron2.utils import comm

    rank = comm.get_rank()
    gt_dir = os.path.join(tmp_dir, f"gt{rank}")  # one GT copy per rank: no concurrent writes
    os.makedirs(gt_dir)
    _, dataset_dicts, gt_by_image = make_synthetic_dataset(gt_dir, "ow_ddp", 11)
    predictions = random_predictions(np.random.default_rng(11), dataset_dicts, gt_by_image)
    metrics = {}
    for evaluator in (
        OpenWorldAREvaluator("ow_ddp", output_dir=os.path.join(tmp_dir, "out")),
        InstanceSegEvaluator("ow_ddp", output_dir=os.path.join(tmp_dir, "out")),
    ):
        evaluator.reset()
        rank_dicts = dataset_dicts[rank::2]
        for d, output in zip(rank_dicts, model_outputs(rank_dicts, predictions)):
            evaluator.process([d], [output])
        results = evaluator.evaluate()  # {} on rank 1, as detectron2's evaluators
        assert bool(results) == comm.is_main_process()
        metrics.update(results.get(evaluator.result_key, {}))
    if comm.is_main_process():
        with open(os.path.join(tmp_dir, "ddp_metrics.json"), "w") as f:
            json.dump(metrics, f)


def test_distributed_evaluation_equals_single_process(tmp_path):
    from detectron2.engine import launch

    launch(_ddp_worker, 2, dist_url="auto", args=(str(tmp_path),))
    ddp_metrics = json.load(open(os.path.join(str(tmp_path), "ddp_metrics.json")))

    _, dataset_dicts, gt_by_image = make_synthetic_dataset(tmp_path, "ow_ddp", 11)
    predictions = random_predictions(np.random.default_rng(11), dataset_dicts, gt_by_image)
    expected = {}
    for evaluator in (
        OpenWorldAREvaluator("ow_ddp", distributed=False),
        InstanceSegEvaluator("ow_ddp", distributed=False),
    ):
        expected.update(run_evaluator(evaluator, dataset_dicts, predictions))
    assert ddp_metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert ddp_metrics[key] == pytest.approx(value, abs=1e-9, nan_ok=True), key
    for prefix in ("open_world", "segm"):
        for rank in (0, 1):
            raw_file = os.path.join(str(tmp_path), "out", f"{prefix}_raw", f"rank{rank}.jsonl")
            assert len(open(raw_file).read().splitlines()) == len(dataset_dicts[rank::2])
