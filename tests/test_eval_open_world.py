"""OpenWorldAREvaluator against a brute-force pycocotools reference: one COCOeval per class
with the class-agnostic predictions relabelled to that class, and one COCOeval with all
ground truth merged into a single category for the class-agnostic AP@100 / AR@100 /
AP_s/m/l / AR_s/m/l; and against lvis-api's LVISEval (ground truth merged into one class, as
the SegPrompt release's tools/eval_orilvisapi.py) on a hand-built case with hand-computed AR."""

import contextlib
import io
import json
import math
import os

import numpy as np
import pycocotools.mask as mask_util
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

from ddp_utils import launch_on_cpu_ranks
from detectron2.data import DatasetCatalog, MetadataCatalog
from lvis import LVIS, LVISEval, LVISResults

from openseg.config import load_config
from openseg.evaluation.instance import InstanceSegEvaluator, _numpy_float_alias
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


AGNOSTIC_STATS = {  # COCOeval.stats index of each class-agnostic metric (maxDets 100)
    "AP@100": 0, "AP_s": 3, "AP_m": 4, "AP_l": 5, "AR@100": 8, "AR_s": 9, "AR_m": 10, "AR_l": 11
}


def brute_force_agnostic(json_file, predictions, image_ids):
    """{metric: COCOeval value in percent (NaN where -1)} with all ground truth in one
    category."""
    coco_gt = reference_coco(json_file, merge_classes=True)
    results = coco_results(predictions, category_of=lambda _: 1)
    stats = quiet_coco_eval(coco_gt, results, image_ids).stats
    return {k: 100 * stats[i] if stats[i] >= 0 else math.nan for k, i in AGNOSTIC_STATS.items()}


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

    agnostic = brute_force_agnostic(json_file, predictions, image_ids)
    for key in ("AP@100", "AR@100", "AP_s", "AP_m", "AP_l"):
        assert metrics[key] == pytest.approx(agnostic[key], abs=1e-6, nan_ok=True), key

    saved = json.load(open(os.path.join(str(tmp_path), "open_world_metrics.json")))
    assert saved["AR_all"] == pytest.approx(metrics["AR_all"])
    raw = open(os.path.join(str(tmp_path), "open_world_raw", "rank0.jsonl")).read().splitlines()
    assert sorted(json.loads(line)["image_id"] for line in raw) == image_ids


def test_class_agnostic_area_recall_matches_cocoeval(tmp_path):
    """Tables 3 and 4: AR_s/m/l of all ground truth as one class (area_recall option)."""
    json_file, dataset_dicts, gt_by_image = make_synthetic_dataset(tmp_path, "ow_agn", 5)
    predictions = random_predictions(np.random.default_rng(25), dataset_dicts, gt_by_image)
    image_ids = sorted(d["image_id"] for d in dataset_dicts)
    evaluator = OpenWorldAREvaluator("ow_agn", distributed=False, area_recall="class_agnostic")
    metrics = run_evaluator(evaluator, dataset_dicts, predictions)
    agnostic = brute_force_agnostic(json_file, predictions, image_ids)
    for key, value in agnostic.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    # the class-wise mean differs on this data, so the option is not a no-op
    class_wise = run_evaluator(
        OpenWorldAREvaluator("ow_agn", distributed=False), dataset_dicts, predictions
    )
    assert any(abs(class_wise[k] - metrics[k]) > 1 for k in ("AR_s", "AR_m", "AR_l"))
    assert class_wise["AR_all"] == metrics["AR_all"] and class_wise["AP_s"] == metrics["AP_s"]


def square_mask(height, width, top, left, size_h, size_w):
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + size_h, left : left + size_w] = True
    return mask


def test_lvis_class_agnostic_hand_built_case(tmp_path):
    """LVIS's class-agnostic evaluation (the release's tools/eval_orilvisapi.py: LVISEval with
    every ground truth and detection relabelled to one class, 100 detections, no federated
    filtering) on two images, with small / medium / large by LVIS's area ranges."""
    size = (200, 200)
    gt = [  # (image, category, mask): areas 100 (s), 1024 (= 32**2: s and m), 10000 (l), 2500 (m)
        (1, 1, square_mask(*size, 0, 0, 10, 10)),
        (1, 2, square_mask(*size, 20, 0, 32, 32)),
        (1, 1, square_mask(*size, 100, 100, 100, 100)),
        (1, 2, square_mask(*size, 0, 150, 50, 50)),
    ]
    detections = {  # image: [(mask, score)]
        1: [
            (square_mask(*size, 60, 0, 40, 40), 0.95),  # false positive, medium
            (gt[0][2], 0.9),  # IoU 1 with the small GT
            (square_mask(*size, 20, 8, 32, 32), 0.85),  # IoU 768 / 1280 = 0.6 with the 32x32
            (square_mask(*size, 100, 100, 80, 100), 0.8),  # IoU 0.8 with the large GT
        ],
        2: [(square_mask(120, 150, 0, 0, 40, 40), 0.7)],  # image without GT: false positive
    }
    images = [{"id": 1, "height": 200, "width": 200}, {"id": 2, "height": 120, "width": 150}]

    def rle(mask):
        encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        encoded["counts"] = encoded["counts"].decode("ascii")
        return encoded

    annotations = [
        {"id": n, "image_id": i, "category_id": c, "segmentation": rle(m),
         "area": float(m.sum()), "bbox": list(mask_util.toBbox(rle(m)))}
        for n, (i, c, m) in enumerate(gt, start=1)
    ]
    categories = [
        {"id": c, "name": f"class{c}", "frequency": "f", "synset": f"class{c}.n.01"}
        for c in (1, 2)
    ]
    for image in images:
        image.update(neg_category_ids=[], not_exhaustive_category_ids=[],
                     file_name=f"{image['id']}.jpg")
    gt_file = tmp_path / "lvis_hand.json"
    gt_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    name = "ow_lvis_hand"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    dataset_dicts = [
        {"file_name": im["file_name"], "image_id": im["id"], "height": im["height"],
         "width": im["width"]}
        for im in images
    ]
    DatasetCatalog.register(name, lambda: dataset_dicts)
    MetadataCatalog.get(name).set(
        json_file=str(gt_file), thing_classes=["class1", "class2"],
        thing_dataset_id_to_contiguous_id={1: 0, 2: 1},
    )
    predictions = {
        i: (np.stack([m for m, _ in dets]), np.array([s for _, s in dets], np.float32),
            np.zeros(len(dets), int))
        for i, dets in detections.items()
    }
    cfg = load_config()
    cfg.TEST.OPEN_WORLD.AREA_RECALL = "class_agnostic"
    metrics = run_evaluator(
        OpenWorldAREvaluator.from_config(cfg, name, None), dataset_dicts, predictions
    )

    # by hand: recall over the 10 IoU thresholds of each GT is 1, 0.3, 0.7, 0
    assert metrics["AR@100"] == pytest.approx(100 * (10 + 3 + 7 + 0) / 40)
    assert metrics["AR_s"] == pytest.approx(100 * (10 + 3) / 20)
    assert metrics["AR_m"] == pytest.approx(100 * (3 + 0) / 20)
    assert metrics["AR_l"] == pytest.approx(100 * 7 / 10)

    merged = json.loads(gt_file.read_text())
    for ann in merged["annotations"]:
        ann["category_id"] = 1
    merged["categories"] = categories[:1]
    for image in merged["images"]:
        image["neg_category_ids"] = [1]  # keeps the detections of images without GT
    merged_file = tmp_path / "lvis_hand_merged.json"
    merged_file.write_text(json.dumps(merged))
    with contextlib.redirect_stdout(io.StringIO()):
        lvis_gt = LVIS(str(merged_file))
        results = [
            {"image_id": i, "category_id": 1, "segmentation": rle(m), "score": s}
            for i, dets in detections.items() for m, s in dets
        ]
        lvis_eval = LVISEval(lvis_gt, LVISResults(lvis_gt, results, max_dets=100), "segm")
        lvis_eval.params.max_dets = 100
        with _numpy_float_alias():
            lvis_eval.run()
    reference = lvis_eval.get_results()
    for ours, theirs in (("AP@100", "AP"), ("AP_s", "APs"), ("AP_m", "APm"), ("AP_l", "APl"),
                         ("AR@100", "AR@100"), ("AR_s", "ARs@100"), ("AR_m", "ARm@100"),
                         ("AR_l", "ARl@100")):
        assert metrics[ours] == pytest.approx(100 * reference[theirs], abs=1e-6), ours
    assert 0 < metrics["AP_m"] < metrics["AP_s"]
    # the pycocotools route agrees too
    agnostic = brute_force_agnostic(str(gt_file), predictions, [1, 2])
    for key, value in agnostic.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


def test_area_recall_option_is_checked():
    with pytest.raises(ValueError, match="AREA_RECALL.*class_agnostic"):
        OpenWorldAREvaluator("openseg_demo_ow_val", distributed=False, area_recall="agnostic")


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
    launch_on_cpu_ranks(_ddp_worker, (str(tmp_path),))
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
