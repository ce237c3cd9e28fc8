"""Time openseg's evaluators against their references on the same generated predictions.

    PYTHONPATH=. python benchmarks/bench_eval.py [--images 40 --height 240 --width 320 ...]

Pairs (ours vs reference):
  panoptic      PanopticEvaluator          vs panopticapi pq_compute (its own process pool)
  semantic      SemanticEvaluator          vs detectron2 SemSegEvaluator
  instance      InstanceSegEvaluator       vs pycocotools COCOeval (segm)
  open-world AR OpenWorldAREvaluator       vs one COCOeval per class (predictions relabelled to
                                              that class), on --ar-classes classes; the LVIS row
                                              runs ours on --lvis-classes classes and extrapolates
                                              the reference linearly per class.
Each row also checks that both sides report the same headline number. Instance and open-world
rows run only when openseg.evaluation.instance / open_world are importable.
"""
import argparse
import contextlib
import importlib.util
import io
import json
import logging
import os
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from detectron2.structures import Instances
from PIL import Image
from tabulate import tabulate

from openseg.evaluation.panoptic import PanopticEvaluator
from openseg.evaluation.semantic import SemanticEvaluator

LABEL_DIVISOR = 1000


def _register(name: str, records: List[dict], **metadata) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(**metadata)


def _timed(fn: Callable[[], object]) -> Tuple[float, object]:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = fn()
    return time.perf_counter() - start, result


def _run_evaluator(evaluator, inputs: List[dict], outputs: List[dict]) -> dict:
    evaluator.reset()
    for model_input, output in zip(inputs, outputs):
        evaluator.process([model_input], [output])
    return evaluator.evaluate()


def _boxes(rng, count: int, h: int, w: int, min_side: int = 4) -> np.ndarray:
    """`count` random boxes (y0, x0, y1, x1) with sides of at least `min_side` pixels."""
    y0 = rng.randint(0, h - min_side, count)
    x0 = rng.randint(0, w - min_side, count)
    y1 = np.minimum(h, y0 + rng.randint(min_side, h // 2 + min_side, count))
    x1 = np.minimum(w, x0 + rng.randint(min_side, w // 2 + min_side, count))
    return np.stack([y0, x0, y1, x1], 1)


def _id_png(path: str, id_map: np.ndarray) -> None:
    ids = id_map.astype(np.uint32)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


# ---------------------------------------------------------------------------- panoptic
def _dataset_ids(segments: List[dict]) -> List[dict]:
    """segments_info with the panoptic JSON's category ids (contiguous id + 1)."""
    return [dict(s, category_id=s["category_id"] + 1) for s in segments]


def bench_panoptic(args, root: str) -> List[list]:
    """Stuff bands + thing boxes as GT; prediction = GT with boxes overwritten, 20% relabelled."""
    rng = np.random.RandomState(args.seed)
    num_classes, num_things = args.classes, args.classes // 2
    categories = [
        {"id": c + 1, "name": f"class{c}", "isthing": int(c < num_things)}
        for c in range(num_classes)
    ]
    gt_dir, pred_dir = os.path.join(root, "pan_gt"), os.path.join(root, "pan_pred")
    os.makedirs(gt_dir)
    os.makedirs(pred_dir)
    h, w = args.height, args.width
    records, inputs, outputs, gt_anns, pred_anns = [], [], [], [], []
    for image_id in range(args.images):
        segment_index = np.repeat(np.arange(4), -(-h // 4))[:h, None].repeat(w, 1)
        classes = list(rng.randint(num_things, num_classes, 4))
        for y0, x0, y1, x1 in _boxes(rng, args.segments, h, w):
            segment_index[y0:y1, x0:x1] = len(classes)
            classes.append(int(rng.randint(0, num_things)))
        segment_index[rng.rand(h, w) < 0.02] = -1
        pred_index = segment_index.copy()
        pred_classes = list(classes)
        for y0, x0, y1, x1 in _boxes(rng, args.segments // 2, h, w):
            pred_index[y0:y1, x0:x1] = len(pred_classes)
            pred_classes.append(int(rng.randint(0, num_classes)))
        flips = rng.rand(len(pred_classes)) < 0.2
        pred_classes = np.where(flips, rng.randint(0, num_classes, len(pred_classes)), pred_classes)

        gt_ids, gt_segments = np.where(segment_index >= 0, segment_index + 1, 0), []
        for i in np.unique(segment_index[segment_index >= 0]):
            gt_segments.append({"id": int(i) + 1, "category_id": int(classes[i]), "iscrowd": 0,
                                "area": int((segment_index == i).sum())})
        pred_ids = pred_index + 1
        pred_segments = [{"id": int(i) + 1, "category_id": int(pred_classes[i])}
                         for i in np.unique(pred_index) if i >= 0]
        png = f"{image_id:05d}.png"
        _id_png(os.path.join(gt_dir, png), gt_ids)
        _id_png(os.path.join(pred_dir, png), pred_ids)
        gt_anns.append({"image_id": image_id, "file_name": png,
                        "segments_info": _dataset_ids(gt_segments)})
        pred_anns.append({"image_id": image_id, "file_name": png,
                          "segments_info": _dataset_ids(pred_segments)})
        file_name = os.path.join(root, f"{image_id:05d}.jpg")
        records.append({"file_name": file_name, "image_id": image_id, "height": h, "width": w,
                        "pan_seg_file_name": os.path.join(gt_dir, png),
                        "segments_info": gt_segments})
        inputs.append({"file_name": file_name, "image_id": image_id})
        outputs.append({"panoptic_seg": (torch.from_numpy(pred_ids).int(), pred_segments)})
    gt_json, pred_json = os.path.join(root, "pan_gt.json"), os.path.join(root, "pan_pred.json")
    with open(gt_json, "w") as f:
        json.dump({"annotations": gt_anns, "categories": categories, "images": []}, f)
    with open(pred_json, "w") as f:
        json.dump({"annotations": pred_anns}, f)
    _register(
        "bench_panoptic", records,
        stuff_classes=[c["name"] for c in categories],
        thing_classes=[c["name"] for c in categories],
        thing_dataset_id_to_contiguous_id={c["id"]: c["id"] - 1 for c in categories[:num_things]},
        stuff_dataset_id_to_contiguous_id={c["id"]: c["id"] - 1 for c in categories},
        label_divisor=LABEL_DIVISOR, ignore_label=255,
        class_splits={"seen": list(range(0, num_classes, 2)),
                      "unseen": list(range(1, num_classes, 2))},
    )
    from panopticapi.evaluation import pq_compute

    ours_s, ours = _timed(lambda: _run_evaluator(
        PanopticEvaluator("bench_panoptic", distributed=False), inputs, outputs))
    ref_s, ref = _timed(lambda: pq_compute(gt_json, pred_json, gt_dir, pred_dir))
    agree = abs(ours["panoptic_seg"]["PQ"] - 100 * ref["All"]["pq"]) < 1e-6
    return [["panoptic PQ", f"{args.images} x {h}x{w}", "panopticapi pq_compute",
             ours_s, ref_s, agree]]


# ---------------------------------------------------------------------------- semantic
def bench_semantic(args, root: str) -> List[list]:
    rng = np.random.RandomState(args.seed + 1)
    h, w, num_classes = args.height, args.width, args.sem_classes
    records, inputs, outputs = [], [], []
    for image_id in range(args.images):
        gt = np.repeat(rng.randint(0, num_classes, (h // 8 + 1, w // 8 + 1)), 8, 0)
        gt = np.repeat(gt, 8, 1)[:h, :w]
        gt[rng.rand(h, w) < 0.05] = 255
        gt_file = os.path.join(root, f"sem_{image_id:05d}.png")
        Image.fromarray(gt.astype(np.uint8)).save(gt_file)
        file_name = os.path.join(root, f"sem_{image_id:05d}.jpg")
        records.append({"file_name": file_name, "sem_seg_file_name": gt_file,
                        "height": h, "width": w, "image_id": image_id})
        scores = torch.rand(num_classes, h, w)
        scores[torch.from_numpy(np.where(gt == 255, 0, gt)), torch.arange(h)[:, None],
               torch.arange(w)[None]] += 0.6
        inputs.append({"file_name": file_name, "image_id": image_id})
        outputs.append({"sem_seg": scores})
    _register("bench_semantic", records, stuff_classes=[f"c{i}" for i in range(num_classes)],
              ignore_label=255, class_splits={"seen": list(range(num_classes // 2))})
    for evaluator in (SemanticEvaluator, SemSegEvaluator):  # warm-up: torch threads, imports
        _timed(lambda: _run_evaluator(evaluator("bench_semantic", distributed=False),
                                      inputs[:1], outputs[:1]))
    ours_s, ours = _timed(lambda: _run_evaluator(
        SemanticEvaluator("bench_semantic", distributed=False), inputs, outputs))
    ref_s, ref = _timed(lambda: _run_evaluator(
        SemSegEvaluator("bench_semantic", distributed=False), inputs, outputs))
    agree = abs(ours["sem_seg"]["mIoU"] - ref["sem_seg"]["mIoU"]) < 1e-6
    return [["semantic mIoU", f"{args.images} x {h}x{w}, {num_classes} cls",
             "detectron2 SemSegEvaluator (+boundary IoU)", ours_s, ref_s, agree]]


# ---------------------------------------------------------------------------- instance
def _instance_case(args, root: str, name: str, num_classes: int, seed: int):
    """COCO-format GT (RLE masks of random boxes) and noisy predictions (shifted GT boxes with
    random classes and scores plus distractors)."""
    rng = np.random.RandomState(seed)
    h, w = args.inst_height, args.inst_width
    images, annotations, records, inputs, outputs = [], [], [], [], []
    for image_id in range(args.inst_images):
        gt_boxes = _boxes(rng, args.instances, h, w)
        gt_classes = rng.randint(0, num_classes, len(gt_boxes))
        masks = np.zeros((len(gt_boxes), h, w), dtype=bool)
        for k, (y0, x0, y1, x1) in enumerate(gt_boxes):
            masks[k, y0:y1, x0:x1] = True
            rle = mask_util.encode(np.asfortranarray(masks[k].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0,
                "category_id": int(gt_classes[k]) + 1, "segmentation": rle,
                "area": float(masks[k].sum()),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            })
        shifted = np.roll(masks, shift=int(rng.randint(-3, 4)), axis=2)
        distractors = np.zeros((args.dets - len(masks), h, w), dtype=bool)
        for k, (y0, x0, y1, x1) in enumerate(_boxes(rng, len(distractors), h, w)):
            distractors[k, y0:y1, x0:x1] = True
        pred_masks = np.concatenate([shifted, distractors])
        pred_classes = np.where(rng.rand(len(pred_masks)) < 0.7,
                                np.concatenate([gt_classes, rng.randint(0, num_classes,
                                                                        len(distractors))]),
                                rng.randint(0, num_classes, len(pred_masks)))
        instances = Instances((h, w))
        instances.pred_masks = torch.from_numpy(pred_masks)
        instances.scores = torch.from_numpy(rng.rand(len(pred_masks)).astype(np.float32))
        instances.pred_classes = torch.from_numpy(pred_classes)
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.jpg"})
        file_name = os.path.join(root, name, f"{image_id}.jpg")
        records.append({"file_name": file_name, "image_id": image_id, "height": h, "width": w})
        inputs.append({"file_name": file_name, "image_id": image_id, "height": h, "width": w})
        outputs.append({"instances": instances})
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(num_classes)]
    json_file = os.path.join(root, f"{name}.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    _register(name, records, json_file=json_file,
              thing_classes=[c["name"] for c in categories],
              thing_dataset_id_to_contiguous_id={c + 1: c for c in range(num_classes)},
              class_splits={"seen": list(range(num_classes // 2)),
                            "unseen": list(range(num_classes // 2, num_classes))})
    return json_file, inputs, outputs


def _coco_results(inputs: List[dict], outputs: List[dict], class_agnostic_id=None) -> List[dict]:
    results = []
    for model_input, output in zip(inputs, outputs):
        instances = output["instances"]
        masks = instances.pred_masks.numpy().astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        for rle, cls, score in zip(rles, instances.pred_classes.tolist(),
                                   instances.scores.tolist()):
            results.append({"image_id": model_input["image_id"], "segmentation": rle,
                            "category_id": class_agnostic_id or cls + 1, "score": score})
    return results


def _cocoeval(coco_gt, results: List[dict], cat_ids=None):
    from pycocotools.cocoeval import COCOeval

    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
    if cat_ids is not None:
        coco_eval.params.catIds = cat_ids
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


def bench_instance(args, root: str) -> List[list]:
    from pycocotools.coco import COCO

    from openseg.evaluation.instance import InstanceSegEvaluator

    json_file, inputs, outputs = _instance_case(args, root, "bench_instance", args.classes,
                                                args.seed + 2)
    ours_s, ours = _timed(lambda: _run_evaluator(
        InstanceSegEvaluator("bench_instance", distributed=False), inputs, outputs))

    def reference():
        coco_gt = COCO(json_file)
        return _cocoeval(coco_gt, _coco_results(inputs, outputs))

    ref_s, ref = _timed(reference)
    agree = abs(ours["segm"]["AP"] - 100 * ref.stats[0]) < 1e-6
    return [["instance AP", f"{args.inst_images} x {args.inst_height}x{args.inst_width}",
             "pycocotools COCOeval", ours_s, ref_s, agree]]


def _per_class_ar_reference(json_file: str, inputs, outputs, num_classes: int):
    """Brute force: for each class c, COCOeval on class c only with every (top-100) prediction
    relabelled to c; AR = recall averaged over IoU thresholds, area "all", 100 detections."""
    from pycocotools.coco import COCO

    coco_gt = COCO(json_file)
    ars = []
    for c in range(1, num_classes + 1):
        if not coco_gt.getAnnIds(catIds=[c]):
            continue
        coco_eval = _cocoeval(coco_gt, _coco_results(inputs, outputs, class_agnostic_id=c), [c])
        recall = coco_eval.eval["recall"][:, 0, 0, -1]
        ars.append(recall.mean())
    return 100 * float(np.mean(ars))


def bench_open_world(args, root: str) -> List[list]:
    from openseg.evaluation.open_world import OpenWorldAREvaluator

    json_file, inputs, outputs = _instance_case(args, root, "bench_ow", args.ar_classes,
                                                args.seed + 3)
    ours_s, ours = _timed(lambda: _run_evaluator(
        OpenWorldAREvaluator("bench_ow", distributed=False), inputs, outputs))
    ref_s, ref_ar = _timed(
        lambda: _per_class_ar_reference(json_file, inputs, outputs, args.ar_classes))
    agree = abs(ours["open_world"]["AR_all"] - ref_ar) < 1e-6
    size = f"{args.inst_images} x {args.inst_height}x{args.inst_width}"
    rows = [["open-world AR", f"{size}, {args.ar_classes} cls", "COCOeval per class",
             ours_s, ref_s, agree]]

    _, lvis_inputs, lvis_outputs = _instance_case(args, root, "bench_ow_lvis", args.lvis_classes,
                                                  args.seed + 3)
    lvis_s, _ = _timed(lambda: _run_evaluator(
        OpenWorldAREvaluator("bench_ow_lvis", distributed=False), lvis_inputs, lvis_outputs))
    with contextlib.redirect_stdout(io.StringIO()):
        from pycocotools.coco import COCO

        classes_with_gt = len(COCO(json_file).getCatIds())
    per_class_s = ref_s / max(classes_with_gt, 1)
    rows.append(["open-world AR (LVIS scale)", f"{size}, {args.lvis_classes} cls",
                 f"COCOeval per class, extrapolated x{args.lvis_classes}",
                 lvis_s, per_class_s * args.lvis_classes, "-"])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="panoptic / semantic images")
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--classes", type=int, default=80,
                        help="panoptic and instance classes")
    parser.add_argument("--segments", type=int, default=12, help="thing segments per image")
    parser.add_argument("--sem-classes", type=int, default=150)
    parser.add_argument("--inst-images", type=int, default=30)
    parser.add_argument("--inst-height", type=int, default=160)
    parser.add_argument("--inst-width", type=int, default=200)
    parser.add_argument("--instances", type=int, default=10, help="GT instances per image")
    parser.add_argument("--dets", type=int, default=50, help="predictions per image (<= 100)")
    parser.add_argument("--ar-classes", type=int, default=20,
                        help="classes of the measured per-class COCOeval reference")
    parser.add_argument("--lvis-classes", type=int, default=1203)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.dets < args.instances:
        parser.error("--dets must be at least --instances (predictions start from the GT)")
    logging.getLogger("openseg").setLevel(logging.WARNING)
    torch.manual_seed(args.seed)

    benches = [bench_panoptic, bench_semantic]
    missing = []
    for module, bench in (("instance", bench_instance), ("open_world", bench_open_world)):
        if importlib.util.find_spec(f"openseg.evaluation.{module}") is None:
            missing.append(module)
        else:
            benches.append(bench)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as root:
        for bench in benches:
            rows += bench(args, root)
    table = [
        [name, data, reference, f"{ours:.2f}", f"{ref:.2f}", f"{ours / ref:.3f}", agree]
        for name, data, reference, ours, ref, agree in rows
    ]
    print(tabulate(table, headers=["metric", "data", "reference", "ours (s)", "reference (s)",
                                   "ours/ref", "same result"], tablefmt="pipe"))
    if missing:
        print(f"skipped (modules not present): {', '.join(missing)}")


if __name__ == "__main__":
    main()
