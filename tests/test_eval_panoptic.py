"""PanopticEvaluator against panopticapi's pq_compute and a brute-force FN breakdown, on
generated panoptic ground truth (PNG + JSON) and randomised predictions."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from ddp_utils import launch_on_cpu_ranks
from panopticapi.evaluation import pq_compute, pq_compute_single_core
from panopticapi.utils import id2rgb
from PIL import Image

from openseg.evaluation.panoptic import PanopticEvaluator

# dataset category ids are deliberately not contiguous
CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 3, "name": "car", "isthing": 1},
    {"id": 7, "name": "dog", "isthing": 1},
    {"id": 9, "name": "cup", "isthing": 1},
    {"id": 20, "name": "sky", "isthing": 0},
    {"id": 21, "name": "road", "isthing": 0},
    {"id": 30, "name": "grass", "isthing": 0},
]
TO_CONTIGUOUS = {c["id"]: i for i, c in enumerate(CATEGORIES)}
TO_DATASET = {i: c["id"] for i, c in enumerate(CATEGORIES)}
NUM_CLASSES = len(CATEGORIES)
SPLITS = {"seen": [0, 1, 4, 5], "unseen": [2, 3, 6]}
LABEL_DIVISOR = 1000


def _random_rect(rng, h, w):
    y0, x0 = rng.randint(0, h - 2), rng.randint(0, w - 2)
    return y0, x0, rng.randint(y0 + 1, h + 1), rng.randint(x0 + 1, w + 1)


def _distinct_ids(rng, n):
    ids = set()
    while len(ids) < n:
        ids.add(int(rng.randint(1, 256**3)))
    return list(ids)


def _random_ground_truth(rng, h, w, empty=False):
    """Segment-index map (0 = VOID) and segments: stuff bands, thing boxes, crowd, void."""
    index = np.zeros((h, w), dtype=np.int64)
    labels = []
    if not empty:
        band_edges = np.sort(rng.choice(np.arange(1, h), size=2, replace=False))
        for y0, y1 in zip([0, *band_edges], [*band_edges, h]):
            index[y0:y1] = len(labels) + 1
            labels.append((int(rng.choice([4, 5, 6])), False))
        for _ in range(rng.randint(1, 6)):
            y0, x0, y1, x1 = _random_rect(rng, h, w)
            index[y0:y1, x0:x1] = len(labels) + 1
            labels.append((int(rng.randint(0, 4)), bool(rng.rand() < 0.2)))
        for _ in range(rng.randint(0, 3)):
            y0, x0, y1, x1 = _random_rect(rng, h, w)
            index[y0:y1, x0 : x0 + max(1, (x1 - x0) // 3)] = 0
    present = [i for i in range(1, len(labels) + 1) if (index == i).any()]
    ids = _distinct_ids(rng, len(present))
    id_map = np.zeros((h, w), dtype=np.int64)
    segments = []
    for segment_id, i in zip(ids, present):
        id_map[index == i] = segment_id
        category, crowd = labels[i - 1]
        segments.append(
            {
                "id": segment_id,
                "category_id": category,
                "iscrowd": int(crowd),
                "area": int((index == i).sum()),
            }
        )
    return id_map, segments


def _random_prediction(rng, gt_id_map, gt_segments, empty=False):
    """Perturbed ground truth: boxes overwritten by new segments or VOID, some classes wrong,
    sometimes shifted; segments_info in contiguous ids."""
    h, w = gt_id_map.shape
    if empty:
        return np.zeros((h, w), dtype=np.int64), []
    gt_class = {s["id"]: s["category_id"] for s in gt_segments}
    source = gt_id_map.copy()
    if rng.rand() < 0.3:
        source = np.roll(source, shift=rng.randint(-3, 4), axis=int(rng.randint(0, 2)))
    next_label = -1
    for _ in range(rng.randint(0, 6)):
        y0, x0, y1, x1 = _random_rect(rng, h, w)
        if rng.rand() < 0.3:
            source[y0:y1, x0:x1] = 0
        else:
            source[y0:y1, x0:x1] = next_label
            next_label -= 1
    labels = [int(v) for v in np.unique(source) if v != 0]
    ids = _distinct_ids(rng, len(labels))
    id_map = np.zeros((h, w), dtype=np.int64)
    segments = []
    for segment_id, label in zip(ids, labels):
        id_map[source == label] = segment_id
        if label in gt_class and rng.rand() < 0.75:
            category = gt_class[label]
        else:
            category = int(rng.randint(0, NUM_CLASSES))
        segments.append({"id": segment_id, "category_id": category, "isthing": category < 4})
    return id_map, segments


def _to_dataset_json(segments, with_area=True):
    out = []
    for s in segments:
        entry = {"id": int(s["id"]), "category_id": TO_DATASET[s["category_id"]]}
        if "iscrowd" in s:
            entry["iscrowd"] = s["iscrowd"]
        if with_area and "area" in s:
            entry["area"] = s["area"]
        out.append(entry)
    return out


def _register(name, records, root, gt_json):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(
        stuff_classes=[c["name"] for c in CATEGORIES],
        thing_classes=[c["name"] for c in CATEGORIES],
        thing_dataset_id_to_contiguous_id={
            c["id"]: i for i, c in enumerate(CATEGORIES) if c["isthing"]
        },
        stuff_dataset_id_to_contiguous_id=dict(TO_CONTIGUOUS),
        label_divisor=LABEL_DIVISOR,
        ignore_label=255,
        panoptic_root=root,
        panoptic_json=gt_json,
        class_splits=SPLITS,
        evaluators=["panoptic"],
    )


def _write_png(path, id_map):
    Image.fromarray(id2rgb(id_map.astype(np.uint32))).save(path)


def make_case(tmp_path, seed, num_images=8, h=24, w=32):
    """Ground truth + predictions on disk (COCO panoptic format) and in detectron2 format.

    Image 0 has an empty prediction, image 1 has no ground-truth segments (all VOID)."""
    rng = np.random.RandomState(seed)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt_annotations, pred_annotations, images, records = [], [], [], []
    inputs, outputs = [], []
    for image_id in range(num_images):
        gt_id_map, gt_segments = _random_ground_truth(rng, h, w, empty=image_id == 1)
        pred_id_map, pred_segments = _random_prediction(
            rng, gt_id_map, gt_segments, empty=image_id == 0
        )
        png = f"{image_id:04d}.png"
        _write_png(gt_dir / png, gt_id_map)
        _write_png(pred_dir / png, pred_id_map)
        images.append({"id": image_id, "file_name": f"{image_id:04d}.jpg", "height": h, "width": w})
        gt_annotations.append(
            {"image_id": image_id, "file_name": png, "segments_info": _to_dataset_json(gt_segments)}
        )
        pred_annotations.append(
            {
                "image_id": image_id,
                "file_name": png,
                "segments_info": _to_dataset_json(pred_segments),
            }
        )
        file_name = str(tmp_path / "images" / f"{image_id:04d}.jpg")
        records.append(
            {
                "file_name": file_name,
                "image_id": image_id,
                "height": h,
                "width": w,
                "pan_seg_file_name": str(gt_dir / png),
                "segments_info": gt_segments,
            }
        )
        inputs.append({"file_name": file_name, "image_id": image_id})
        outputs.append({"panoptic_seg": (torch.from_numpy(pred_id_map).int(), pred_segments)})
    gt_json, pred_json = tmp_path / "gt.json", tmp_path / "pred.json"
    gt_json.write_text(
        json.dumps({"images": images, "annotations": gt_annotations, "categories": CATEGORIES})
    )
    pred_json.write_text(json.dumps({"annotations": pred_annotations}))
    name = f"test_panoptic_{seed}_{os.getpid()}"
    _register(name, records, str(gt_dir), str(gt_json))
    return {
        "name": name,
        "inputs": inputs,
        "outputs": outputs,
        "gt_json": str(gt_json),
        "pred_json": str(pred_json),
        "gt_dir": str(gt_dir),
        "pred_dir": str(pred_dir),
        "gt_annotations": gt_annotations,
        "pred_annotations": pred_annotations,
    }


def _evaluate(case, output_dir, batch=3):
    evaluator = PanopticEvaluator(case["name"], output_dir=str(output_dir), distributed=False)
    evaluator.reset()
    for start in range(0, len(case["inputs"]), batch):
        evaluator.process(
            case["inputs"][start : start + batch], case["outputs"][start : start + batch]
        )
    results = evaluator.evaluate()["panoptic_seg"]
    with open(os.path.join(output_dir, "panoptic_seg_metrics.json")) as f:
        detail = json.load(f)
    return results, detail


def _reference(case):
    with contextlib.redirect_stdout(io.StringIO()):
        summary = pq_compute(
            case["gt_json"],
            case["pred_json"],
            gt_folder=case["gt_dir"],
            pred_folder=case["pred_dir"],
        )
        stat = pq_compute_single_core(
            0,
            list(zip(case["gt_annotations"], case["pred_annotations"])),
            case["gt_dir"],
            case["pred_dir"],
            {c["id"]: c for c in CATEGORIES},
        )
    return summary, stat


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_panopticapi(tmp_path, seed):
    case = make_case(tmp_path, seed)
    results, detail = _evaluate(case, tmp_path / "out")
    reference, stat = _reference(case)

    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            assert detail["groups"][group][key.upper()] == pytest.approx(
                reference[group][key], abs=1e-6
            )
            assert results[key.upper() + suffix] == pytest.approx(
                100 * reference[group][key], abs=1e-4
            )
        assert detail["groups"][group]["n"] == reference[group]["n"]
    for row in detail["per_class"]:
        dataset_id = TO_DATASET[row["id"]]
        for key in ("pq", "sq", "rq"):
            expected = reference["per_class"][dataset_id][key]
            assert row[key.upper()] == pytest.approx(expected, abs=1e-6)
        assert row["TP"] == stat[dataset_id].tp
        assert row["FP"] == stat[dataset_id].fp
        assert row["FN"] == stat[dataset_id].fn
        assert row["IoU_sum"] == pytest.approx(stat[dataset_id].iou, abs=1e-9)
        assert row["FN_seg"] + row["FN_cls"] == row["FN"]

    # split columns: means over the split's classes that have any TP / FP / FN
    for split, ids in SPLITS.items():
        present = [
            i
            for i in ids
            if stat[TO_DATASET[i]].tp + stat[TO_DATASET[i]].fp + stat[TO_DATASET[i]].fn > 0
        ]
        expected = np.mean([reference["per_class"][TO_DATASET[i]]["pq"] for i in present])
        assert results[f"PQ_{split}"] == pytest.approx(100 * expected, abs=1e-4)
        assert detail["groups"][split]["n"] == len(present)


def _brute_force_fn_breakdown(case):
    """Loop over every (gt, pred) segment pair with boolean masks."""
    fn_seg, fn_cls = np.zeros(NUM_CLASSES, int), np.zeros(NUM_CLASSES, int)
    for gt_ann, pred_ann in zip(case["gt_annotations"], case["pred_annotations"]):
        gt = np.array(Image.open(os.path.join(case["gt_dir"], gt_ann["file_name"])), np.int64)
        gt = gt[..., 0] + 256 * gt[..., 1] + 65536 * gt[..., 2]
        pred = np.array(Image.open(os.path.join(case["pred_dir"], pred_ann["file_name"])), np.int64)
        pred = pred[..., 0] + 256 * pred[..., 1] + 65536 * pred[..., 2]
        for g in gt_ann["segments_info"]:
            if g["iscrowd"]:
                continue
            gt_mask = gt == g["id"]
            same, other = False, False
            for p in pred_ann["segments_info"]:
                pred_mask = pred == p["id"]
                inter = np.logical_and(gt_mask, pred_mask).sum()
                union = (
                    pred_mask.sum()
                    + gt_mask.sum()
                    - inter
                    - np.logical_and(pred_mask, gt == 0).sum()
                )
                if inter and inter / union > 0.5:
                    if p["category_id"] == g["category_id"]:
                        same = True
                    else:
                        other = True
            if not same:
                (fn_cls if other else fn_seg)[TO_CONTIGUOUS[g["category_id"]]] += 1
    return fn_seg, fn_cls


@pytest.mark.parametrize("seed", [4, 5])
def test_false_negative_breakdown_brute_force(tmp_path, seed):
    case = make_case(tmp_path, seed, num_images=6)
    results, detail = _evaluate(case, tmp_path / "out")
    fn_seg, fn_cls = _brute_force_fn_breakdown(case)
    assert [row["FN_seg"] for row in detail["per_class"]] == fn_seg.tolist()
    assert [row["FN_cls"] for row in detail["per_class"]] == fn_cls.tolist()
    assert results["FN_seg"] == fn_seg.sum() and results["FN_cls"] == fn_cls.sum()


def _single_image_case(tmp_path, gt_id_map, gt_segments, record_extra=None):
    gt_png = tmp_path / "gt.png"
    _write_png(gt_png, gt_id_map)
    file_name = str(tmp_path / "img.jpg")
    record = {
        "file_name": file_name,
        "image_id": 0,
        "height": gt_id_map.shape[0],
        "width": gt_id_map.shape[1],
        "pan_seg_file_name": str(gt_png),
        "segments_info": gt_segments,
    }
    record.update(record_extra or {})
    name = f"test_panoptic_single_{os.getpid()}"
    _register(name, [record], str(tmp_path), "")
    return name, file_name


def _run_single(name, file_name, pred_id_map, pred_segments, output_dir=None):
    evaluator = PanopticEvaluator(name, output_dir=output_dir, distributed=False)
    evaluator.reset()
    evaluator.process(
        [{"file_name": file_name, "image_id": 0}],
        [{"panoptic_seg": (torch.as_tensor(pred_id_map), pred_segments)}],
    )
    return evaluator.evaluate()["panoptic_seg"]


def test_hand_computed_fn_breakdown(tmp_path):
    """Left block: person predicted as car (FN_cls + FP car); right block: person missed
    (FN_seg); bottom: sky predicted exactly (TP, IoU 1)."""
    gt = np.zeros((4, 8), np.int64)
    gt[:2, :4], gt[:2, 4:], gt[2:] = 11, 12, 13
    gt_segments = [
        {"id": 11, "category_id": 0, "iscrowd": 0},
        {"id": 12, "category_id": 0, "iscrowd": 0},
        {"id": 13, "category_id": 4, "iscrowd": 0},
    ]
    name, file_name = _single_image_case(tmp_path, gt, gt_segments)
    pred = np.zeros((4, 8), np.int64)
    pred[:2, :4], pred[2:] = 5, 6
    results = _run_single(
        name, file_name, pred, [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 4}]
    )
    assert results["FN_cls"] == 1 and results["FN_seg"] == 1
    # person: TP 0, FN 2 -> PQ 0; car: FP 1 -> PQ 0; sky: PQ 1 -> mean over 3 classes
    assert results["PQ"] == pytest.approx(100 / 3)
    assert results["PQ_th"] == 0 and results["PQ_st"] == pytest.approx(100)
    assert results["PQ_seen"] == pytest.approx(100 / 3)
    assert np.isnan(results["PQ_unseen"])


def test_segments_info_none_matches_panopticapi(tmp_path):
    """`category * label_divisor + instance` maps with -1 VOID (detectron2's convention)."""
    case = make_case(tmp_path, seed=7, num_images=5)
    pred_annotations = []
    for model_input, output, annotation in zip(
        case["inputs"], case["outputs"], case["pred_annotations"]
    ):
        id_map, segments = output["panoptic_seg"]
        id_map = id_map.numpy().astype(np.int64)
        label_map = np.full(id_map.shape, -1, np.int64)
        for instance, s in enumerate(segments):
            label_map[id_map == s["id"]] = s["category_id"] * LABEL_DIVISOR + instance
        output["panoptic_seg"] = (torch.from_numpy(label_map), None)
        _write_png(os.path.join(case["pred_dir"], annotation["file_name"]), label_map + 1)
        pred_annotations.append(
            {
                "image_id": annotation["image_id"],
                "file_name": annotation["file_name"],
                "segments_info": [
                    {"id": int(v) + 1, "category_id": TO_DATASET[int(v) // LABEL_DIVISOR]}
                    for v in np.unique(label_map)
                    if v != -1
                ],
            }
        )
    with open(case["pred_json"], "w") as f:
        json.dump({"annotations": pred_annotations}, f)
    case["pred_annotations"] = pred_annotations
    _, detail = _evaluate(case, tmp_path / "out")
    reference, _ = _reference(case)
    for group in ("All", "Things", "Stuff"):
        assert detail["groups"][group]["PQ"] == pytest.approx(reference[group]["pq"], abs=1e-6)
        assert detail["groups"][group]["n"] == reference[group]["n"]


def test_raw_records_and_metrics_written(tmp_path):
    case = make_case(tmp_path, seed=8, num_images=4)
    _evaluate(case, tmp_path / "out")
    lines = (tmp_path / "out" / "panoptic_seg_raw" / "rank0.jsonl").read_text().splitlines()
    assert [json.loads(line)["image_id"] for line in lines] == [0, 1, 2, 3]
    assert json.loads(lines[0])["class_ids"] == sorted(json.loads(lines[0])["class_ids"])


def test_image_without_ground_truth_file_counts_predictions_as_false_positives(tmp_path):
    gt = np.zeros((4, 4), np.int64)
    name, file_name = _single_image_case(tmp_path, gt, [])
    record = DatasetCatalog.get(name)[0]
    del record["pan_seg_file_name"]
    pred = np.zeros((4, 4), np.int64)
    pred[:2], pred[2:] = 3, 4
    results = _run_single(
        name,
        file_name,
        pred,
        [{"id": 3, "category_id": 0}, {"id": 4, "category_id": 5}],
        output_dir=str(tmp_path / "out"),
    )
    detail = json.loads((tmp_path / "out" / "panoptic_seg_metrics.json").read_text())
    assert [(r["FP"], r["TP"], r["FN"]) for r in detail["per_class"] if r["FP"]] == [
        (1, 0, 0),
        (1, 0, 0),
    ]
    assert results["PQ"] == 0


@pytest.mark.parametrize(
    "pred_segments, pred_shape, message",
    [
        ([{"id": 1, "category_id": NUM_CLASSES}], (4, 4), f"category_id {NUM_CLASSES}"),
        ([{"id": 1, "category_id": -1}], (4, 4), "category_id -1"),
        ([{"id": 1, "category_id": 0}], (5, 4), r"\(5, 4\).*\(4, 4\)"),
        ([], (4, 4), r"segment ids \[1\]"),
        ([{"id": 1, "category_id": 0}, {"id": 2, "category_id": 0}], (4, 4), "no pixels"),
    ],
)
def test_bad_predictions_raise(tmp_path, pred_segments, pred_shape, message):
    gt = np.full((4, 4), 7, np.int64)
    name, file_name = _single_image_case(tmp_path, gt, [{"id": 7, "category_id": 0}])
    pred = np.ones(pred_shape, np.int64)
    with pytest.raises(ValueError, match=message) as error:
        _run_single(name, file_name, pred, pred_segments)
    assert "img.jpg" in str(error.value)


def test_unknown_category_in_label_map_raises(tmp_path):
    gt = np.full((4, 4), 7, np.int64)
    name, file_name = _single_image_case(tmp_path, gt, [{"id": 7, "category_id": 0}])
    label_map = np.full((4, 4), 9 * LABEL_DIVISOR, np.int64)
    with pytest.raises(ValueError, match="category_id 9") as error:
        _run_single(name, file_name, label_map, None)
    assert "img.jpg" in str(error.value)


def test_image_outside_dataset_raises(tmp_path):
    gt = np.full((4, 4), 7, np.int64)
    name, _ = _single_image_case(tmp_path, gt, [{"id": 7, "category_id": 0}])
    with pytest.raises(ValueError, match="other.jpg"):
        _run_single(name, "other.jpg", np.ones((4, 4), np.int64), [{"id": 1, "category_id": 0}])


def _distributed_worker(case_dir, name, seed, num_images, output_dir):
    from detectron2.utils import comm

    case = make_case_from_disk(case_dir, name, seed, num_images)
    evaluator = PanopticEvaluator(name, output_dir=output_dir, distributed=True)
    evaluator.reset()
    rank, world = comm.get_rank(), comm.get_world_size()
    for i in range(rank, num_images, world):
        evaluator.process([case["inputs"][i]], [case["outputs"][i]])
    results = evaluator.evaluate()
    assert (results is None) == (rank != 0)


def make_case_from_disk(case_dir, name, seed, num_images):
    """Rebuild a case in a spawned process (same seed -> same data) into a fresh directory."""
    import pathlib

    tmp = pathlib.Path(case_dir) / f"rank_data_{os.getpid()}"
    tmp.mkdir()
    case = make_case(tmp, seed, num_images)
    records = DatasetCatalog.get(case["name"])
    _register(name, records, case["gt_dir"], case["gt_json"])
    return case


def test_distributed_gather_matches_single_process(tmp_path):
    torch.manual_seed(0)
    num_images = 6
    launch_on_cpu_ranks(
        _distributed_worker,
        (str(tmp_path), "test_panoptic_ddp", 9, num_images, str(tmp_path / "ddp")),
    )
    ddp = json.loads((tmp_path / "ddp" / "panoptic_seg_metrics.json").read_text())
    rank_files = sorted(os.listdir(tmp_path / "ddp" / "panoptic_seg_raw"))
    assert rank_files == ["rank0.jsonl", "rank1.jsonl"]
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    case = make_case(single_dir, 9, num_images)
    _, single = _evaluate(case, tmp_path / "single_out")
    assert ddp["num_images"] == single["num_images"] == num_images
    for ddp_row, single_row in zip(ddp["per_class"], single["per_class"]):
        for key in ("TP", "FP", "FN", "FN_seg", "FN_cls"):
            assert ddp_row[key] == single_row[key]
        assert ddp_row["PQ"] == pytest.approx(single_row["PQ"], abs=1e-12)
