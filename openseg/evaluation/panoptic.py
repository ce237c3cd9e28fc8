"""Panoptic Quality (Kirillov et al., "Panoptic Segmentation", CVPR 2019, Sec. 4) with
class-split columns and a false-negative breakdown.

The per-image matching is a joint histogram of (ground-truth segment, predicted segment) pixel
pairs, after which every rule of the reference implementation (panopticapi `pq_compute`) is
applied to whole arrays:

* a pair matches when both have the same class, the ground truth is not crowd, and
  IoU > 0.5, where the union excludes the predicted pixels that fall on VOID (id 0);
* unmatched non-crowd ground truth is a false negative (FN);
* an unmatched prediction is a false positive (FP) unless more than half of its area lies on
  VOID plus the crowd region of its class (the last crowd segment of that class in the
  ground-truth `segments_info`, as in panopticapi);
* ground-truth areas come from `segments_info[i]["area"]` when given (as panopticapi reads
  them from the panoptic JSON), else from the PNG.

Each FN is further split into FN_cls (some predicted segment of another class has IoU > 0.5
with it: a classification error) and FN_seg (none has: the object was not segmented).
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.utils.file_io import PathManager
from PIL import Image

from .base import SplitAwareEvaluator, check_ground_truth_size, contiguous_class_names

__all__ = ["PanopticEvaluator", "PanopticStats", "panoptic_image_stats", "rgb_to_segment_ids"]

STAT_FIELDS = ("tp", "fp", "fn", "iou", "fn_seg", "fn_cls")


@dataclass
class PanopticStats:
    """Per-class PQ counts: TP/FP/FN, summed IoU of the TPs and the FN breakdown."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    iou: np.ndarray
    fn_seg: np.ndarray
    fn_cls: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> "PanopticStats":
        return cls(
            **{
                name: np.zeros(num_classes, dtype=np.float64 if name == "iou" else np.int64)
                for name in STAT_FIELDS
            }
        )

    def add_sparse(self, record: dict) -> None:
        """Add a per-image record holding only its non-zero classes (`class_ids`)."""
        class_ids = np.asarray(record["class_ids"], dtype=np.int64)
        for name in STAT_FIELDS:
            np.add.at(getattr(self, name), class_ids, np.asarray(record[name]))

    def to_sparse(self) -> dict:
        """Fields restricted to the classes with any count, as plain lists."""
        active = np.flatnonzero(self.tp + self.fp + self.fn)
        sparse = {"class_ids": active.tolist()}
        for name in STAT_FIELDS:
            sparse[name] = getattr(self, name)[active].tolist()
        return sparse


def rgb_to_segment_ids(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colours to segment ids: R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _segment_index(
    id_map: np.ndarray, segment_ids: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Index of each pixel's segment in `segment_ids`; -1 for VOID (0), -2 for other ids."""
    flat = id_map.ravel()
    index = np.full(flat.shape, -2, dtype=np.int64)
    index[flat == 0] = -1
    if segment_ids.size:
        order = np.argsort(segment_ids, kind="stable")
        sorted_ids = segment_ids[order]
        position = np.minimum(np.searchsorted(sorted_ids, flat), sorted_ids.size - 1)
        known = sorted_ids[position] == flat
        index[known] = order[position[known]]
    return index, flat


def panoptic_image_stats(
    gt_id_map: np.ndarray,
    gt_segments: Sequence[dict],
    pred_id_map: np.ndarray,
    pred_segments: Sequence[dict],
    num_classes: int,
    image_name: str = "",
) -> PanopticStats:
    """PQ counts of one image (panopticapi's rules, see the module docstring).

    Args:
        gt_id_map, pred_id_map: H x W segment ids, 0 = VOID.
        gt_segments: dicts with `id`, contiguous `category_id`, optional `iscrowd`, `area`.
        pred_segments: dicts with `id` and contiguous `category_id`.
        num_classes: size of the contiguous class space.
        image_name: used in error messages.
    """
    if gt_id_map.shape != pred_id_map.shape:
        raise ValueError(
            f"Image {image_name}: predicted panoptic map has size {tuple(pred_id_map.shape)} "
            f"but the ground truth has size {tuple(gt_id_map.shape)}; predictions must be at "
            "the ground-truth resolution."
        )
    gt_ids = np.array([int(s["id"]) for s in gt_segments], dtype=np.int64)
    gt_cat = np.array([int(s["category_id"]) for s in gt_segments], dtype=np.int64)
    gt_crowd = np.array([bool(s.get("iscrowd", 0)) for s in gt_segments], dtype=bool)
    pred_ids = np.array([int(s["id"]) for s in pred_segments], dtype=np.int64)
    pred_cat = np.array([int(s["category_id"]) for s in pred_segments], dtype=np.int64)
    _check_segments(image_name, "ground-truth", gt_ids, gt_cat, num_classes)
    _check_segments(image_name, "predicted", pred_ids, pred_cat, num_classes)

    num_gt, num_pred = gt_ids.size, pred_ids.size
    gt_index, _ = _segment_index(gt_id_map, gt_ids)
    pred_index, pred_flat = _segment_index(pred_id_map, pred_ids)
    unknown = pred_index == -2
    if unknown.any():
        raise ValueError(
            f"Image {image_name}: predicted panoptic map contains segment ids "
            f"{np.unique(pred_flat[unknown])[:10].tolist()} that are not in its segments_info."
        )
    # Rows: gt segments, VOID, other ids; columns: predicted segments, VOID.
    gt_index[gt_index == -1] = num_gt
    gt_index[gt_index == -2] = num_gt + 1
    pred_index[pred_index == -1] = num_pred
    joint = np.bincount(
        gt_index * (num_pred + 1) + pred_index, minlength=(num_gt + 2) * (num_pred + 1)
    ).reshape(num_gt + 2, num_pred + 1)

    pred_area = joint[:, :num_pred].sum(axis=0)
    if num_pred and (pred_area == 0).any():
        raise ValueError(
            f"Image {image_name}: predicted segments {pred_ids[pred_area == 0].tolist()} are in "
            "segments_info but have no pixels in the panoptic map."
        )
    pixel_area = joint[:num_gt].sum(axis=1)
    gt_area = np.array(
        [s.get("area", pixel_area[i]) for i, s in enumerate(gt_segments)], dtype=np.float64
    )
    void_overlap = joint[num_gt, :num_pred]
    intersection = joint[:num_gt, :num_pred].astype(np.float64)
    union = pred_area[None, :] + gt_area[:, None] - intersection - void_overlap[None, :]
    iou = np.divide(
        intersection, union, out=np.zeros_like(intersection), where=intersection > 0
    )
    overlaps = iou > 0.5
    same_class = gt_cat[:, None] == pred_cat[None, :]
    match = overlaps & same_class & ~gt_crowd[:, None]
    gt_matched, pred_matched = match.any(axis=1), match.any(axis=0)

    stats = PanopticStats.zeros(num_classes)
    match_gt, _ = np.nonzero(match)
    stats.tp += np.bincount(gt_cat[match_gt], minlength=num_classes)
    stats.iou += np.bincount(gt_cat[match_gt], weights=iou[match], minlength=num_classes)

    missed = ~gt_matched & ~gt_crowd
    misclassified = missed & overlaps.any(axis=1)
    stats.fn += np.bincount(gt_cat[missed], minlength=num_classes)
    stats.fn_cls += np.bincount(gt_cat[misclassified], minlength=num_classes)
    stats.fn_seg += np.bincount(gt_cat[missed & ~misclassified], minlength=num_classes)

    crowd_of_class = np.full(num_classes, -1, dtype=np.int64)
    for segment_index in np.flatnonzero(gt_crowd):
        crowd_of_class[gt_cat[segment_index]] = segment_index
    pred_crowd = crowd_of_class[pred_cat]
    has_crowd = pred_crowd >= 0
    crowd_overlap = np.zeros(num_pred)
    crowd_overlap[has_crowd] = intersection[pred_crowd[has_crowd], np.flatnonzero(has_crowd)]
    ignored = (void_overlap + crowd_overlap) / np.maximum(pred_area, 1) > 0.5
    false_positive = ~pred_matched & ~ignored
    stats.fp += np.bincount(pred_cat[false_positive], minlength=num_classes)
    return stats


def _check_segments(
    image_name: str, kind: str, ids: np.ndarray, categories: np.ndarray, num_classes: int
) -> None:
    bad = (categories < 0) | (categories >= num_classes)
    if bad.any():
        raise ValueError(
            f"Image {image_name}: {kind} segment {int(ids[bad][0])} has category_id "
            f"{int(categories[bad][0])}, not a contiguous id of the dataset's {num_classes} "
            "classes."
        )
    if (ids == 0).any():
        raise ValueError(f"Image {image_name}: {kind} segment id 0 is reserved for VOID.")
    if np.unique(ids).size != ids.size:
        raise ValueError(f"Image {image_name}: {kind} segments_info repeats a segment id.")


class PanopticEvaluator(SplitAwareEvaluator):
    """PQ / SQ / RQ for All, Things, Stuff and every `class_splits` subset, per class, with
    the FN_seg / FN_cls breakdown.

    Reads detectron2's `panoptic_seg` output `(id_map, segments_info)` with contiguous
    `category_id`s; with `segments_info` None the map holds `category * label_divisor +
    instance` and -1 for VOID, as detectron2's COCOPanopticEvaluator accepts. Ground truth is
    the dataset dicts' `pan_seg_file_name` + `segments_info` (contiguous ids). An image whose
    dict has no `pan_seg_file_name` has no ground truth: all its predictions are FPs.
    """

    result_key = "panoptic_seg"

    def __init__(
        self, dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True
    ):
        super().__init__(dataset_name, output_dir, distributed)
        self._class_names = contiguous_class_names(self._metadata)
        self._num_classes = len(self._class_names)
        thing_map = self._metadata.get("thing_dataset_id_to_contiguous_id", None)
        if thing_map is None:
            raise ValueError(
                f"Dataset '{dataset_name}' has no `thing_dataset_id_to_contiguous_id` metadata, "
                "which PanopticEvaluator needs to tell things from stuff."
            )
        self._isthing = np.zeros(self._num_classes, dtype=bool)
        self._isthing[list(thing_map.values())] = True
        self._splits = self.class_splits(self._num_classes)
        self._ground_truth = {
            record["file_name"]: record for record in DatasetCatalog.get(dataset_name)
        }

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        for model_input, output in zip(inputs, outputs):
            file_name = model_input["file_name"]
            id_map, segments_info = output["panoptic_seg"]
            id_map = id_map.cpu().numpy().astype(np.int64)
            if segments_info is None:
                id_map, segments_info = self._segments_from_label_map(id_map, file_name)
            gt_id_map, gt_segments = self._load_ground_truth(file_name, id_map.shape)
            check_ground_truth_size(
                gt_id_map.shape, id_map.shape, file_name,
                self._ground_truth[file_name].get("pan_seg_file_name", "(none)"),
                (model_input["height"], model_input["width"]) if "height" in model_input else None,
            )
            stats = panoptic_image_stats(
                gt_id_map, gt_segments, id_map, segments_info, self._num_classes, file_name
            )
            image_id = model_input.get("image_id")
            self.record({"file_name": file_name, "image_id": image_id, **stats.to_sparse()})

    def _segments_from_label_map(
        self, label_map: np.ndarray, file_name: str
    ) -> Tuple[np.ndarray, List[dict]]:
        label_divisor = self._metadata.get("label_divisor", None)
        if label_divisor is None:
            raise ValueError(
                f"Image {file_name}: panoptic_seg has segments_info None, which needs the "
                f"`label_divisor` metadata of dataset '{self._dataset_name}'."
            )
        if (label_map < -1).any():
            raise ValueError(
                f"Image {file_name}: panoptic label map has values below -1 (-1 is VOID)."
            )
        labels = np.unique(label_map)
        labels = labels[labels != -1]
        segments = [
            {"id": int(label) + 1, "category_id": int(label // label_divisor)} for label in labels
        ]
        return label_map + 1, segments

    def _load_ground_truth(
        self, file_name: str, pred_shape: Tuple[int, int]
    ) -> Tuple[np.ndarray, List[dict]]:
        record = self._ground_truth.get(file_name)
        if record is None:
            raise ValueError(
                f"Image {file_name} is not in dataset '{self._dataset_name}'; evaluate a model "
                "on the dataset the evaluator was built for."
            )
        if "pan_seg_file_name" not in record:
            height, width = record.get("height", pred_shape[0]), record.get("width", pred_shape[1])
            # No ground truth: a non-VOID id that is no segment, so every prediction is a FP.
            return np.full((height, width), -1, dtype=np.int64), []
        with PathManager.open(record["pan_seg_file_name"], "rb") as f:
            gt_id_map = rgb_to_segment_ids(np.asarray(Image.open(f).convert("RGB")))
        return gt_id_map, record.get("segments_info", [])

    def evaluate(self) -> Optional[Dict[str, Dict[str, float]]]:
        records = self.gathered_records()
        if records is None:
            return None
        stats = PanopticStats.zeros(self._num_classes)
        for record in records:
            stats.add_sparse(record)
        detail = self._summarize(stats)
        detail["num_images"] = len(records)
        self._report(detail)
        self.save_metrics(detail)
        return OrderedDict({self.result_key: detail["summary"]})

    def _summarize(self, stats: PanopticStats) -> dict:
        """Per-class PQ = SQ x RQ and group means over the classes with any TP/FP/FN."""
        denominator = stats.tp + 0.5 * stats.fp + 0.5 * stats.fn
        valid = denominator > 0
        safe = np.where(valid, denominator, 1.0)
        pq = np.where(valid, stats.iou / safe, 0.0)
        sq = np.where(stats.tp > 0, stats.iou / np.maximum(stats.tp, 1), 0.0)
        rq = np.where(valid, stats.tp / safe, 0.0)

        all_ids = np.arange(self._num_classes)
        groups = {
            "All": all_ids,
            "Things": all_ids[self._isthing],
            "Stuff": all_ids[~self._isthing],
            **self._splits,
        }
        suffix = {"All": "", "Things": "_th", "Stuff": "_st"}
        group_metrics, summary = {}, OrderedDict()
        for group, ids in groups.items():
            ids = ids[valid[ids]]
            n = int(ids.size)
            means = {
                name: float(np.mean(values[ids])) if n else float("nan")
                for name, values in (("PQ", pq), ("SQ", sq), ("RQ", rq))
            }
            group_metrics[group] = {**means, "n": n}
            for name, value in means.items():
                summary[f"{name}{suffix.get(group, '_' + group)}"] = 100 * value
        summary["FN_seg"] = float(stats.fn_seg.sum())
        summary["FN_cls"] = float(stats.fn_cls.sum())
        for class_id, name in enumerate(self._class_names):
            summary[f"PQ-{name}"] = 100 * float(pq[class_id])

        class_split_names = [
            [split for split, ids in self._splits.items() if class_id in ids]
            for class_id in range(self._num_classes)
        ]
        per_class = [
            {
                "id": class_id,
                "name": self._class_names[class_id],
                "isthing": bool(self._isthing[class_id]),
                "splits": class_split_names[class_id],
                "PQ": float(pq[class_id]),
                "SQ": float(sq[class_id]),
                "RQ": float(rq[class_id]),
                "TP": int(stats.tp[class_id]),
                "FP": int(stats.fp[class_id]),
                "FN": int(stats.fn[class_id]),
                "FN_seg": int(stats.fn_seg[class_id]),
                "FN_cls": int(stats.fn_cls[class_id]),
                "IoU_sum": float(stats.iou[class_id]),
            }
            for class_id in range(self._num_classes)
        ]
        return {"summary": summary, "groups": group_metrics, "per_class": per_class}

    def _report(self, detail: dict) -> None:
        self.log_table(
            "Panoptic quality",
            [
                [group, 100 * m["PQ"], 100 * m["SQ"], 100 * m["RQ"], m["n"]]
                for group, m in detail["groups"].items()
            ],
            ["", "PQ", "SQ", "RQ", "#classes"],
        )
        columns = ["PQ", "SQ", "RQ", "TP", "FP", "FN", "FN_seg", "FN_cls"]
        self.log_table(
            "Panoptic quality per class",
            [
                [row["name"], "/".join(row["splits"])]
                + [100 * row[c] if c in ("PQ", "SQ", "RQ") else row[c] for c in columns]
                for row in detail["per_class"]
            ],
            ["class", "split"] + columns,
        )
