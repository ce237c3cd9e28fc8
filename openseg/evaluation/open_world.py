"""Class-wise average recall for open-world instance segmentation (SegPrompt, Zhu et al. ICCV
2023, Sec. 4.3 "Evaluation metric").

Class-agnostic predictions (top `max_dets` per image by score) are matched against the ground
truth of each class separately with COCO's rules (greedy by score, IoU thresholds 0.5:0.05:0.95,
crowd regions matchable by many predictions and never counted). A class's recall is its matched
non-crowd ground truth over its non-crowd ground truth; its AR averages that over the IoU
thresholds. AR_all / AR_<subset> average class ARs over all classes / a `class_splits` subset,
AR_s / AR_m / AR_l do the same with only ground truth in COCO's area ranges counted. Classes
without ground truth (in the subset's area range, on the evaluated images) have no recall and
are left out of every mean, as in COCOeval. This equals running COCOeval once per class with the
predictions relabelled to that class, but the IoUs of an image are computed once and the greedy
matching runs for all classes, thresholds and area ranges together, so LVIS's 1,203 classes cost
about as much as one class.

AP@100 / AR@100 and AP_s / AP_m / AP_l are the class-agnostic numbers: all ground truth as one
class (COCOeval with a single category and 100 detections; LVISEval gives the same with its
ground truth merged into one class and every image's detections kept, the release's
tools/eval_orilvisapi.py). Small / medium / large are COCO's and LVIS's area ranges (the
ground truth's `area`, the detection's mask area; bounds inclusive). `area_recall` chooses what
AR_s / AR_m / AR_l are: "class_wise" (the mean over classes above; Table 2, the release's
tools/eval_lvis_ow.py) or "class_agnostic" (recall of the merged ground truth, "the original
LVIS class-agnostic evaluation" of Tables 3 and 4). Values are in percent; NaN when undefined.
"""

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch

from .base import SplitAwareEvaluator, contiguous_class_names, split_means
from .instance import encode_instance_masks, ground_truth_json, load_coco_api, predicted_instances

__all__ = [
    "AREA_RECALL_MODES",
    "AREA_RANGES",
    "IOU_THRESHOLDS",
    "RECALL_THRESHOLDS",
    "OpenWorldAREvaluator",
    "class_agnostic_ap_ar",
    "greedy_match",
]

# COCOeval's parameters (pycocotools Params.setDetParams), built the same way so they compare equal
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = {
    "all": (0.0, 1e5**2),
    "s": (0.0, 32.0**2),
    "m": (32.0**2, 96.0**2),
    "l": (96.0**2, 1e5**2),
}

AREA_RECALL_MODES = ("class_wise", "class_agnostic")


def greedy_match(
    ious: np.ndarray,
    gt_crowd: np.ndarray,
    gt_ignored: np.ndarray,
    group_starts: np.ndarray,
    iou_thresholds: np.ndarray = IOU_THRESHOLDS,
) -> Tuple[np.ndarray, np.ndarray]:
    """COCOeval.evaluateImg's matching, run independently inside each group of ground truth.

    Args:
        ious: [D, G] IoUs of detections sorted by decreasing score vs ground truth (crowd
            columns as pycocotools computes them: intersection over detection area).
        gt_crowd: [G] bool; a crowd may be matched by any number of detections.
        gt_ignored: [A, G] bool, one row per area range; a detection takes a non-ignored match
            when one is available and an ignored one only otherwise.
        group_starts: [S] first column of each group; columns of a group are contiguous and in
            the ground truth's original order (ties in IoU go to the later column, as in COCO).
        iou_thresholds: [T].
    Returns:
        gt_matched [A, T, G] bool (for non-crowd columns: taken by a detection) and
        det_match [A, T, S, D]: the column each detection matched in each group, -1 if none.
    """
    num_dets, num_gt = ious.shape
    num_areas = gt_ignored.shape[0]
    num_thresholds = len(iou_thresholds)
    num_groups = len(group_starts)
    gt_matched = np.zeros((num_areas, num_thresholds, num_gt), dtype=bool)
    det_match = np.full((num_areas, num_thresholds, num_groups, num_dets), -1, dtype=np.int64)
    if num_dets == 0 or num_gt == 0:
        return gt_matched, det_match
    group_of_gt = np.repeat(np.arange(num_groups), np.diff(np.append(group_starts, num_gt)))
    column = np.arange(num_gt)
    ignored = gt_ignored[:, None, :]
    iou_thresholds = np.minimum(iou_thresholds, 1 - 1e-10)  # as COCO: IoU 1 is reachable
    # a detection below the lowest threshold with every ground truth can never match
    for det in np.flatnonzero(ious.max(axis=1) >= iou_thresholds.min()):
        det_ious = ious[det]
        eligible = (det_ious[None, :] >= iou_thresholds[:, None])[None] & (gt_crowd | ~gt_matched)
        eligible_kept = eligible & ~ignored
        has_kept = np.logical_or.reduceat(eligible_kept, group_starts, axis=2)
        candidates = np.where(has_kept[..., group_of_gt], eligible_kept, eligible & ignored)
        values = np.where(candidates, det_ious, -1.0)
        best = np.maximum.reduceat(values, group_starts, axis=2)[..., group_of_gt]
        winners = candidates & (values == best)
        chosen = np.maximum.reduceat(np.where(winners, column, -1), group_starts, axis=2)
        area_idx, thr_idx, group_idx = np.nonzero(chosen >= 0)
        columns = chosen[area_idx, thr_idx, group_idx]
        gt_matched[area_idx, thr_idx, columns] = True
        det_match[area_idx, thr_idx, group_idx, det] = columns
    return gt_matched, det_match


def class_agnostic_ap_ar(
    scores: np.ndarray, det_matched: np.ndarray, det_ignored: np.ndarray, num_gt: int
) -> Tuple[float, float]:
    """COCOeval.accumulate + summarize for one category and area range (fractions, not %).

    Args:
        scores: [N] scores of all evaluated detections, concatenated in image-id order.
        det_matched / det_ignored: [T, N] bool; matched to a ground truth / to an ignored one.
        num_gt: number of non-ignored ground truth.
    Returns (AP averaged over IoU and the 101 recall thresholds, AR averaged over IoU);
    both NaN without ground truth.
    """
    if num_gt == 0:
        return float("nan"), float("nan")
    num_dets = len(scores)
    if num_dets == 0:
        return 0.0, 0.0
    order = np.argsort(-scores, kind="mergesort")
    matched, ignored = det_matched[:, order], det_ignored[:, order]
    tp_sum = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)
    fp_sum = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)
    recall = tp_sum / num_gt
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    # precision envelope: the best precision at any higher recall
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    sampled = np.zeros((len(recall), len(RECALL_THRESHOLDS)))
    for thr_idx, (rc, pr) in enumerate(zip(recall, precision)):
        positions = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
        reached = positions < num_dets
        sampled[thr_idx, reached] = pr[positions[reached]]
    return float(sampled.mean()), float(recall[:, -1].mean())


def _bits_to_bool(bits: np.ndarray, num_thresholds: int) -> np.ndarray:
    """[N] ints with bit t set where true at threshold t -> [T, N] bool."""
    return ((bits[None, :] >> np.arange(num_thresholds)[:, None]) & 1).astype(bool)


class OpenWorldAREvaluator(SplitAwareEvaluator):
    """Class-wise AR (AR_all, AR_<class_splits subset>, AR_s/m/l) and class-agnostic AP@100 /
    AR@100 / AP_s/m/l of class-agnostic `instances` (pred_classes are ignored).

    Matching happens per image in `process` (so it is spread over the ranks); the per-image
    record holds the counts needed to reduce: per ground-truth class and area range the
    non-crowd GT count and matched count per IoU threshold, plus the class-agnostic
    detections' scores and, per area range, match bits (bit t = matched / ignored at IoU
    threshold t; ignored = matched to a crowd or out-of-range GT, or unmatched and outside the
    range) and kept GT counts.
    """

    result_key = "open_world"

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        max_dets: int = 100,
        area_recall: str = "class_wise",
    ):
        super().__init__(dataset_name, output_dir=output_dir, distributed=distributed)
        if max_dets <= 0:
            raise ValueError(f"max_dets must be positive, got {max_dets}.")
        if area_recall not in AREA_RECALL_MODES:
            raise ValueError(
                f"area_recall (cfg.TEST.OPEN_WORLD.AREA_RECALL) must be one of "
                f"{AREA_RECALL_MODES}, got {area_recall!r}."
            )
        self._max_dets = int(max_dets)
        self._area_recall = area_recall
        self._json_file = ground_truth_json(self._metadata, dataset_name, output_dir)
        self._coco_gt = load_coco_api(self._json_file)
        id_map = self._metadata.get("thing_dataset_id_to_contiguous_id", None)
        if not id_map:
            raise ValueError(
                f"Dataset '{dataset_name}' has no metadata `thing_dataset_id_to_contiguous_id`; "
                f"it is needed to assign the ground truth of {self._json_file} to classes."
            )
        self._dataset_id_to_contiguous = {int(d): int(c) for d, c in id_map.items()}
        self._class_names = contiguous_class_names(self._metadata)
        self._area_bounds = np.array(list(AREA_RANGES.values()))

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        """cfg.TEST.OPEN_WORLD.{MAX_DETS, AREA_RECALL}."""
        return cls(
            dataset_name,
            output_dir=output_dir,
            max_dets=cfg.TEST.OPEN_WORLD.MAX_DETS,
            area_recall=cfg.TEST.OPEN_WORLD.AREA_RECALL,
        )

    def _image_ground_truth(self, image_id: int):
        """The image's GT (sorted by class, original order within a class): RLEs, contiguous
        classes, crowd flags, areas (annotation `area`, else the mask's)."""
        anns = self._coco_gt.imgToAnns.get(image_id, [])
        unknown = sorted({a["category_id"] for a in anns} - set(self._dataset_id_to_contiguous))
        if unknown:
            raise ValueError(
                f"{self._json_file}: annotations of image {image_id} have category ids "
                f"{unknown} missing from metadata `thing_dataset_id_to_contiguous_id` of "
                f"dataset '{self._dataset_name}'."
            )
        classes = np.array([self._dataset_id_to_contiguous[a["category_id"]] for a in anns])
        order = np.argsort(classes, kind="mergesort")
        anns = [anns[i] for i in order]
        rles = [self._coco_gt.annToRLE(a) for a in anns]
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        areas = np.array(
            [a["area"] if "area" in a else mask_util.area(r) for a, r in zip(anns, rles)],
            dtype=np.float64,
        )
        return rles, classes[order].astype(np.int64), crowd, areas

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        for input_dict, output in zip(inputs, outputs):
            self.record(self._evaluate_image(input_dict, output))

    def _evaluate_image(self, input_dict: dict, output: dict) -> dict:
        image_id = input_dict["image_id"]
        file_name = input_dict.get("file_name")
        image_info = self._coco_gt.imgs.get(image_id)
        if image_info is None:
            raise ValueError(
                f"Image {file_name} has image_id {image_id}, which is not an image of "
                f"{self._json_file}."
            )
        instances = predicted_instances(input_dict, output)
        gt_size = (int(image_info["height"]), int(image_info["width"]))
        if gt_size != (int(input_dict["height"]), int(input_dict["width"])):
            raise ValueError(
                f"Image {file_name}: dataset dict size {(input_dict['height'], input_dict['width'])}"
                f" differs from {gt_size} in {self._json_file}."
            )
        scores = instances.scores.numpy().astype(np.float64)
        top = np.argsort(-scores, kind="mergesort")[: self._max_dets]
        scores = scores[top]
        det_rles = encode_instance_masks(instances.pred_masks[torch.from_numpy(top)])
        gt_rles, gt_classes, gt_crowd, gt_areas = self._image_ground_truth(image_id)
        if det_rles and gt_rles:
            ious = np.asarray(mask_util.iou(det_rles, gt_rles, gt_crowd.astype(np.uint8).tolist()))
        else:
            ious = np.zeros((len(det_rles), len(gt_rles)))
        out_of_range = (gt_areas[None] < self._area_bounds[:, :1]) | (
            gt_areas[None] > self._area_bounds[:, 1:]
        )
        gt_ignored = gt_crowd[None] | out_of_range  # [A, G]

        classes, class_starts = np.unique(gt_classes, return_index=True)
        class_matched, _ = greedy_match(ious, gt_crowd, gt_ignored, class_starts)
        kept = ~gt_ignored  # [A, G]
        if len(classes):
            num_gt = np.add.reduceat(kept.astype(np.int64), class_starts, axis=1).T
            num_matched = np.add.reduceat(
                (class_matched & kept[:, None]).astype(np.int64), class_starts, axis=2
            ).transpose(2, 0, 1)
        else:
            num_gt = np.zeros((0, len(AREA_RANGES)), dtype=np.int64)
            num_matched = np.zeros((0, len(AREA_RANGES), len(IOU_THRESHOLDS)), dtype=np.int64)

        # class-agnostic: all ground truth as one group, every area range
        _, agnostic_match = greedy_match(ious, gt_crowd, gt_ignored, np.zeros(1, np.int64))
        match = agnostic_match[:, :, 0]  # [A, T, D] matched column, -1 if none
        padded = np.concatenate([gt_ignored, np.zeros((len(AREA_RANGES), 1), bool)], axis=1)
        matched_ignored = np.take_along_axis(padded[:, None, :], match, axis=2)  # -1: False
        det_areas = np.asarray(mask_util.area(det_rles), np.float64) if det_rles else np.zeros(0)
        det_out = (det_areas[None] < self._area_bounds[:, :1]) | (
            det_areas[None] > self._area_bounds[:, 1:]
        )
        ignored = matched_ignored | ((match < 0) & det_out[:, None, :])
        powers = 1 << np.arange(len(IOU_THRESHOLDS))[None, :, None]
        return {
            "image_id": image_id,
            "file_name": file_name,
            "classes": classes,
            "num_gt": num_gt,
            "num_matched": num_matched,
            "scores": scores,
            "matched_bits": ((match >= 0) * powers).sum(axis=1),
            "ignored_bits": (ignored * powers).sum(axis=1),
            "num_gt_agnostic": kept.sum(axis=1),
        }

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        records = self.gathered_records()
        if records is None:
            return {}
        if not records:
            self._logger.warning(f"{type(self).__name__} received no images; no metrics.")
            return {}
        records = sorted(records, key=lambda r: r["image_id"])
        num_classes = len(self._class_names)
        area_names = list(AREA_RANGES)
        gt_count = np.zeros((num_classes, len(area_names)))
        matched_count = np.zeros((num_classes, len(area_names), len(IOU_THRESHOLDS)))
        for record in records:
            if record["classes"]:
                np.add.at(gt_count, record["classes"], record["num_gt"])
                np.add.at(matched_count, record["classes"], record["num_matched"])
        has_gt = gt_count > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            class_ar = 100 * (matched_count / gt_count[..., None]).mean(axis=-1)
        class_ar[~has_gt] = np.nan

        every_class = {"all": np.arange(num_classes)}
        subsets = {**every_class, **self.class_splits(num_classes)}
        metrics = {
            f"AR_{name}": value
            for name, value in split_means(class_ar[:, 0], has_gt[:, 0], subsets).items()
        }
        agnostic = self._class_agnostic(records)
        for area_idx, area_name in enumerate(area_names[1:], start=1):
            if self._area_recall == "class_wise":
                area_ar = split_means(class_ar[:, area_idx], has_gt[:, area_idx], every_class)
                metrics[f"AR_{area_name}"] = area_ar["all"]
            else:
                metrics[f"AR_{area_name}"] = agnostic[area_name][1]
        metrics[f"AP@{self._max_dets}"], metrics[f"AR@{self._max_dets}"] = agnostic["all"]
        for area_name in area_names[1:]:
            metrics[f"AP_{area_name}"] = agnostic[area_name][0]
        for contiguous_id in sorted(set(self._dataset_id_to_contiguous.values())):
            metrics[f"AR-{self._class_names[contiguous_id]}"] = float(class_ar[contiguous_id, 0])

        summary = [k for k in metrics if "-" not in k]
        area_kind = self._area_recall.replace("_", "-")
        self.log_table(
            f"Open-world class-wise AR@{self._max_dets} (%; AR_s/m/l {area_kind})",
            [[metrics[k] for k in summary]],
            summary,
        )
        self.save_metrics(metrics)
        return {self.result_key: metrics}

    def _class_agnostic(self, records: Sequence[dict]) -> Dict[str, Tuple[float, float]]:
        """{area name: (AP, AR) in percent} of all ground truth as one class."""
        scores = np.concatenate([np.asarray(r["scores"], dtype=np.float64) for r in records])
        num_thresholds = len(IOU_THRESHOLDS)
        results = {}
        for area_idx, area_name in enumerate(AREA_RANGES):
            bits = {
                key: np.concatenate(
                    [np.asarray(r[key], np.int64).reshape(len(AREA_RANGES), -1)[area_idx]
                     for r in records]
                )
                for key in ("matched_bits", "ignored_bits")
            }
            ap, ar = class_agnostic_ap_ar(
                scores,
                _bits_to_bool(bits["matched_bits"], num_thresholds),
                _bits_to_bool(bits["ignored_bits"], num_thresholds),
                int(sum(np.asarray(r["num_gt_agnostic"])[area_idx] for r in records)),
            )
            results[area_name] = (100 * ap, 100 * ar)
        return results
