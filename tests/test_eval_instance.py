"""InstanceSegEvaluator against direct pycocotools / lvis runs on generated data.

`make_synthetic_dataset` and `model_outputs` are also used by test_eval_open_world.py.
"""

import contextlib
import io
import json
import math
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.structures import Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from openseg.data.datasets.common import register_lazy
from openseg.evaluation.instance import InstanceSegEvaluator

IMAGE_SIZES = [(128, 120), (112, 128), (96, 100), (128, 128), (100, 112)]
DATASET_CATEGORY_IDS = [3, 7, 11, 20, 25, 42]  # non-contiguous, as in COCO
CLASS_SPLITS = {"known": [0, 1], "seen": [0, 1, 2, 3], "unseen": [4, 5]}


def random_box_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A rectangle of a random scale class (COCO small / medium / large) inside the image."""
    side = rng.choice([rng.integers(4, 30), rng.integers(34, 90), rng.integers(100, 128)])
    box_h = int(min(height, max(2, side + rng.integers(-3, 4))))
    box_w = int(min(width, max(2, side + rng.integers(-3, 4))))
    top = rng.integers(0, height - box_h + 1)
    left = rng.integers(0, width - box_w + 1)
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + box_h, left : left + box_w] = True
    return mask


def jitter_mask(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """`mask` shifted by a few pixels, with a random hole: IoUs spread over 0.3..1."""
    shift = rng.integers(-4, 5, size=2) * (rng.random() < 0.7)
    moved = np.roll(mask, tuple(int(s) for s in shift), axis=(0, 1))
    if rng.random() < 0.5:
        ys, xs = np.nonzero(moved)
        if len(ys):
            y, x = ys[len(ys) // 2], xs[len(xs) // 2]
            moved[max(0, y - 3) : y + 3, max(0, x - 3) : x + 3] = False
    return moved


def _gt_segmentation(rng: np.random.Generator, mask: np.ndarray, crowd: bool):
    """Polygon for some non-crowd boxes (exercises COCO's polygon path), RLE otherwise."""
    if not crowd and rng.random() < 0.3:
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        return [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]]
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def make_synthetic_dataset(tmp_path, name: str, seed: int, lvis: bool = False):
    """Write a random COCO- (or LVIS-) format GT file, register it, and return
    (json_file, dataset dicts, per-image GT masks with contiguous classes).

    The last category never has ground truth and the last image has none at all; about one
    annotation in eight is a crowd region (never in LVIS format).
    """
    rng = np.random.default_rng(seed)
    images, annotations, dataset_dicts, gt_by_image = [], [], [], {}
    for index, (height, width) in enumerate(IMAGE_SIZES):
        image_id = 100 + 7 * index
        image = {
            "id": image_id,
            "file_name": f"img{image_id}.jpg",
            "height": height,
            "width": width,
        }
        gt_by_image[image_id] = []
        has_gt = index < len(IMAGE_SIZES) - 1
        for contiguous_id, category_id in enumerate(DATASET_CATEGORY_IDS[:-1]):
            for _ in range(rng.integers(0, 4) if has_gt else 0):
                mask = random_box_mask(rng, height, width)
                crowd = (not lvis) and rng.random() < 0.125
                segmentation = _gt_segmentation(rng, mask, crowd)
                ann = {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": segmentation,
                    "area": float(mask.sum()),
                    "bbox": [0.0, 0.0, 1.0, 1.0],
                }
                if not lvis:
                    ann["iscrowd"] = int(crowd)
                annotations.append(ann)
                gt_by_image[image_id].append((mask, contiguous_id, crowd))
        if lvis:
            present = {a["category_id"] for a in annotations if a["image_id"] == image_id}
            image["neg_category_ids"] = [c for c in DATASET_CATEGORY_IDS if c not in present][:2]
            image["not_exhaustive_category_ids"] = []
        images.append(image)
        dataset_dicts.append(
            {
                "file_name": image["file_name"],
                "image_id": image_id,
                "height": height,
                "width": width,
            }
        )
    categories = [{"id": c, "name": f"class{c}"} for c in DATASET_CATEGORY_IDS]
    if lvis:
        for category, frequency in zip(categories, "rrccff"):
            category["frequency"] = frequency
    json_file = os.path.join(str(tmp_path), f"{name}.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)

    register_lazy(
        name,
        lambda: dataset_dicts,
        json_file=json_file,
        thing_classes=[c["name"] for c in categories],
        thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(DATASET_CATEGORY_IDS)},
        class_splits=CLASS_SPLITS,
    )
    return json_file, dataset_dicts, gt_by_image


def random_predictions(rng: np.random.Generator, dataset_dicts, gt_by_image, max_per_image=30):
    """Per image: (bool masks [N, H, W], scores [N], contiguous classes [N]).

    Jittered copies of GT (some duplicated, to make predictions compete), random boxes, and a
    few repeated scores (ties are broken by prediction order, identically in pycocotools).
    """
    predictions = {}
    for d in dataset_dicts:
        height, width = d["height"], d["width"]
        masks = [
            jitter_mask(rng, m) for m, _, _ in gt_by_image[d["image_id"]] if rng.random() < 0.8
        ]
        masks += [jitter_mask(rng, m) for m in masks[: len(masks) // 3]]
        masks += [random_box_mask(rng, height, width) for _ in range(rng.integers(0, 8))]
        masks = masks[:max_per_image]
        scores = np.round(rng.random(len(masks)), 1 if rng.random() < 0.5 else 6)
        classes = rng.integers(0, len(DATASET_CATEGORY_IDS), size=len(masks))
        stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        predictions[d["image_id"]] = (stacked, scores.astype(np.float32), classes)
    return predictions


def empty_predictions(dataset_dicts):
    """No instance in any image, in the format of `random_predictions`."""
    return {
        d["image_id"]: (np.zeros((0, d["height"], d["width"]), bool), np.zeros(0, np.float32), [])
        for d in dataset_dicts
    }


def model_outputs(dataset_dicts, predictions):
    """detectron2 model outputs (one `instances` per image) for `predictions`."""
    outputs = []
    for d in dataset_dicts:
        masks, scores, classes = predictions[d["image_id"]]
        instances = Instances((d["height"], d["width"]))
        instances.pred_masks = torch.from_numpy(masks)
        instances.scores = torch.from_numpy(scores)
        instances.pred_classes = torch.from_numpy(np.asarray(classes, dtype=np.int64))
        outputs.append({"instances": instances})
    return outputs


def coco_results(predictions, category_of=lambda c: DATASET_CATEGORY_IDS[c]):
    """COCO result entries of `predictions` (RLE masks, dataset category ids), in order."""
    results = []
    for image_id, (masks, scores, classes) in predictions.items():
        for mask, score, cls in zip(masks, scores, classes):
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category_of(int(cls)),
                    "segmentation": rle,
                    "score": float(score),
                }
            )
    return results


def run_evaluator(evaluator, dataset_dicts, predictions):
    evaluator.reset()
    for d, output in zip(dataset_dicts, model_outputs(dataset_dicts, predictions)):
        evaluator.process([d], [output])
    return evaluator.evaluate()[evaluator.result_key]


def quiet_coco_eval(coco_gt: COCO, results, image_ids, **params) -> COCOeval:
    """COCOeval segm on `image_ids`, other params overridden by keyword (catIds=[...],
    maxDets=[...]), without its prints; summarized when maxDets is COCO's (1, 10, 100)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
        coco_eval.params.imgIds = image_ids
        for key, value in params.items():
            setattr(coco_eval.params, key, value)
        coco_eval.evaluate()
        coco_eval.accumulate()
        if len(coco_eval.params.maxDets) == 3:
            coco_eval.summarize()
    return coco_eval


@pytest.mark.parametrize("seed", [0, 1])
def test_ap_and_split_columns_match_pycocotools(tmp_path, seed):
    json_file, dataset_dicts, gt_by_image = make_synthetic_dataset(tmp_path, f"inst_{seed}", seed)
    predictions = random_predictions(np.random.default_rng(seed + 10), dataset_dicts, gt_by_image)
    if seed == 1:  # evaluate a subset: GT of images not processed must not count
        dataset_dicts = dataset_dicts[1:]
        predictions = {d["image_id"]: predictions[d["image_id"]] for d in dataset_dicts}
    metrics = run_evaluator(
        InstanceSegEvaluator(f"inst_{seed}", output_dir=str(tmp_path), distributed=False),
        dataset_dicts,
        predictions,
    )

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(json_file)
    image_ids = sorted(d["image_id"] for d in dataset_dicts)
    results = coco_results(predictions)
    stats = quiet_coco_eval(coco_gt, results, image_ids).stats
    for index, key in enumerate(["AP", "AP50", "AP75", "APs", "APm", "APl"]):
        expected = 100 * stats[index] if stats[index] >= 0 else float("nan")
        assert metrics[key] == pytest.approx(expected, abs=1e-6, nan_ok=True), key

    per_class = {}
    for contiguous_id, category_id in enumerate(DATASET_CATEGORY_IDS):
        ap = quiet_coco_eval(
            coco_gt, coco_results(predictions), image_ids, catIds=[category_id]
        ).stats[0]
        per_class[contiguous_id] = 100 * ap if ap >= 0 else float("nan")
        assert metrics[f"AP-class{category_id}"] == pytest.approx(
            per_class[contiguous_id], abs=1e-6, nan_ok=True
        )
    assert math.isnan(per_class[len(DATASET_CATEGORY_IDS) - 1])  # the class without GT
    for split_name, ids in CLASS_SPLITS.items():
        defined = [per_class[c] for c in ids if not math.isnan(per_class[c])]
        expected = float(np.mean(defined)) if defined else float("nan")
        assert metrics[f"AP_{split_name}"] == pytest.approx(expected, abs=1e-6, nan_ok=True)
    assert math.isnan(metrics["AP_unseen"]) is False  # class 4 has GT, class 5 is excluded

    saved = json.load(open(os.path.join(str(tmp_path), "segm_metrics.json")))
    assert saved["AP"] == pytest.approx(metrics["AP"])
    raw_lines = open(os.path.join(str(tmp_path), "segm_raw", "rank0.jsonl")).read().splitlines()
    assert [json.loads(line)["image_id"] for line in raw_lines] == image_ids


def test_empty_predictions_give_zero_ap_and_image_without_gt_is_fine(tmp_path):
    _, dataset_dicts, gt_by_image = make_synthetic_dataset(tmp_path, "inst_empty", 3)
    metrics = run_evaluator(
        InstanceSegEvaluator("inst_empty", distributed=False),
        dataset_dicts,
        empty_predictions(dataset_dicts),
    )
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0
    assert metrics["AP_seen"] == 0.0
    assert math.isnan(metrics[f"AP-class{DATASET_CATEGORY_IDS[-1]}"])

    # only the image without ground truth, with one prediction: no GT, so AP is undefined
    last = dataset_dicts[-1]
    assert not gt_by_image[last["image_id"]]
    mask = np.zeros((1, last["height"], last["width"]), bool)
    mask[0, :10, :10] = True
    metrics = run_evaluator(
        InstanceSegEvaluator("inst_empty", distributed=False),
        [last],
        {last["image_id"]: (mask, np.array([0.9], np.float32), [0])},
    )
    assert math.isnan(metrics["AP"])


def test_unknown_class_id_and_wrong_mask_size_are_rejected(tmp_path):
    _, dataset_dicts, _ = make_synthetic_dataset(tmp_path, "inst_bad", 4)
    d = dataset_dicts[0]
    evaluator = InstanceSegEvaluator("inst_bad", distributed=False)
    evaluator.reset()
    masks = np.zeros((2, d["height"], d["width"]), bool)
    bad_class = {d["image_id"]: (masks, np.array([0.5, 0.4], np.float32), [1, 6])}
    with pytest.raises(ValueError, match=r"img100\.jpg.*image_id 100.*\[6\]"):
        evaluator.process([d], model_outputs([d], bad_class))

    wrong_size = np.zeros((1, d["height"] + 1, d["width"]), bool)
    outputs = model_outputs([d], {d["image_id"]: (wrong_size, np.ones(1, np.float32), [0])})
    with pytest.raises(ValueError, match=r"img100\.jpg.*\(129, 120\).*\(128, 120\)"):
        evaluator.process([d], outputs)

    soft = model_outputs([d], {d["image_id"]: (masks, np.array([0.5, 0.4], np.float32), [1, 2])})
    soft[0]["instances"].pred_masks = torch.full((2, d["height"], d["width"]), 0.7)
    with pytest.raises(ValueError, match=r"img100\.jpg.*values other than 0 and 1"):
        evaluator.process([d], soft)


def test_binary_float_masks_equal_bool_masks(tmp_path):
    _, dataset_dicts, gt_by_image = make_synthetic_dataset(tmp_path, "inst_float", 6)
    predictions = random_predictions(np.random.default_rng(16), dataset_dicts, gt_by_image)
    evaluator = InstanceSegEvaluator("inst_float", distributed=False)
    expected = run_evaluator(evaluator, dataset_dicts, predictions)
    evaluator.reset()
    for d, output in zip(dataset_dicts, model_outputs(dataset_dicts, predictions)):
        output["instances"].pred_masks = output["instances"].pred_masks.float()  # Mask2Former's
        evaluator.process([d], [output])
    assert evaluator.evaluate()["segm"] == pytest.approx(expected, nan_ok=True)


def test_lvis_format_matches_lvis_eval(tmp_path):
    from lvis import LVIS, LVISEval, LVISResults

    from openseg.evaluation.instance import _numpy_float_alias

    json_file, dataset_dicts, gt_by_image = make_synthetic_dataset(
        tmp_path, "inst_lvis", 5, lvis=True
    )
    predictions = random_predictions(np.random.default_rng(15), dataset_dicts, gt_by_image)
    metrics = run_evaluator(
        InstanceSegEvaluator("inst_lvis", distributed=False), dataset_dicts, predictions
    )
    lvis_gt = LVIS(json_file)
    lvis_eval = LVISEval(lvis_gt, LVISResults(lvis_gt, coco_results(predictions)), "segm")
    with _numpy_float_alias():
        lvis_eval.run()
    for key in ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"]:
        value = lvis_eval.results[key]
        expected = 100 * value if value >= 0 else float("nan")
        assert metrics[key] == pytest.approx(expected, abs=1e-6, nan_ok=True), key
    assert "AP_seen" in metrics and "AP_unseen" in metrics
