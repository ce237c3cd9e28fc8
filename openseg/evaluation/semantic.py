"""Semantic segmentation metrics (COCO-Stuff protocol, Caesar et al. CVPR 2018): mIoU, fwIoU,
mACC and pACC from one confusion matrix, overall and for every `class_splits` subset.

The definitions are detectron2's SemSegEvaluator's: a class enters mIoU / mACC only if it has
ground-truth pixels, ignored ground-truth pixels are left out of every count, and fwIoU weights
each class's IoU by its share of ground-truth pixels.
"""
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.file_io import PathManager
from PIL import Image

from .base import SplitAwareEvaluator, check_ground_truth_size, contiguous_class_names, gather_to_main

__all__ = ["SemanticEvaluator", "semantic_metrics"]


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else float("nan")


def semantic_metrics(confusion: np.ndarray, class_ids: Optional[np.ndarray] = None) -> dict:
    """mIoU, fwIoU, mACC, pACC (fractions) and per-class IoU / ACC of `confusion`.

    `confusion[p, g]` counts pixels predicted `p` with ground truth `g` (ignored pixels
    excluded); `class_ids` restricts the means to a subset of classes (fwIoU and pACC then
    weigh and count only that subset's ground-truth pixels).
    """
    tp = np.diagonal(confusion).astype(np.float64)
    pos_gt = confusion.sum(axis=0).astype(np.float64)
    pos_pred = confusion.sum(axis=1).astype(np.float64)
    union = pos_gt + pos_pred - tp
    acc_valid = pos_gt > 0
    iou_valid = acc_valid & (union > 0)
    acc = np.divide(tp, pos_gt, out=np.full_like(tp, np.nan), where=acc_valid)
    iou = np.divide(tp, union, out=np.full_like(tp, np.nan), where=iou_valid)
    if class_ids is None:
        class_ids = np.arange(tp.size)
    in_subset = np.zeros(tp.size, dtype=bool)
    in_subset[class_ids] = True
    acc_valid &= in_subset
    iou_valid &= in_subset
    gt_pixels = pos_gt[in_subset].sum()
    return {
        "mIoU": _ratio(iou[iou_valid].sum(), iou_valid.sum()),
        "fwIoU": _ratio((iou[iou_valid] * pos_gt[iou_valid]).sum(), gt_pixels),
        "mACC": _ratio(acc[acc_valid].sum(), acc_valid.sum()),
        "pACC": _ratio(tp[in_subset].sum(), gt_pixels),
        "IoU": iou,
        "ACC": acc,
    }


class SemanticEvaluator(SplitAwareEvaluator):
    """mIoU / fwIoU / mACC / pACC overall and per class subset (mIoU_seen, mIoU_unseen, ...).

    Reads `sem_seg` outputs: C x H x W scores (argmax over C) or an H x W map of contiguous
    class ids. Ground truth is each dataset dict's `sem_seg_file_name`; its `ignore_label`
    pixels are left out, so an image whose ground truth is all ignore contributes nothing.
    """

    result_key = "sem_seg"

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        num_classes: Optional[int] = None,
        ignore_label: Optional[int] = None,
    ):
        super().__init__(dataset_name, output_dir, distributed)
        self._class_names = contiguous_class_names(self._metadata)
        if num_classes is not None and num_classes != len(self._class_names):
            raise ValueError(
                f"SemanticEvaluator(num_classes={num_classes}) disagrees with the "
                f"{len(self._class_names)} classes in the metadata of '{dataset_name}'."
            )
        self._num_classes = len(self._class_names)
        if ignore_label is None:
            ignore_label = self._metadata.get("ignore_label", None)
        if ignore_label is None:
            raise ValueError(
                f"Dataset '{dataset_name}' has no `ignore_label` metadata; set it or pass "
                "SemanticEvaluator(ignore_label=...)."
            )
        self._ignore_label = int(ignore_label)
        self._splits = self.class_splits(self._num_classes)
        self._gt_files = {
            record["file_name"]: record.get("sem_seg_file_name")
            for record in DatasetCatalog.get(dataset_name)
        }
        self._confusion = np.zeros((self._num_classes, self._num_classes), dtype=np.int64)

    def reset(self) -> None:
        super().reset()
        self._confusion = np.zeros((self._num_classes, self._num_classes), dtype=np.int64)

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        for model_input, output in zip(inputs, outputs):
            file_name = model_input["file_name"]
            prediction = self._predicted_labels(output["sem_seg"], file_name)
            gt = self._load_ground_truth(file_name)
            check_ground_truth_size(
                gt.shape, prediction.shape, file_name, self._gt_files[file_name],
                (model_input["height"], model_input["width"]) if "height" in model_input else None,
            )
            labelled = gt != self._ignore_label
            confusion = np.bincount(
                prediction[labelled] * self._num_classes + gt[labelled],
                minlength=self._num_classes**2,
            ).reshape(self._num_classes, self._num_classes)
            self._confusion += confusion
            gt_pixels, pred_pixels = confusion.sum(axis=0), confusion.sum(axis=1)
            present = np.flatnonzero(gt_pixels + pred_pixels)
            self.record(
                {
                    "file_name": file_name,
                    "labelled_pixels": int(labelled.sum()),
                    "class_ids": present,
                    "intersection": np.diagonal(confusion)[present],
                    "gt_pixels": gt_pixels[present],
                    "pred_pixels": pred_pixels[present],
                },
                keep=False,
            )

    def _predicted_labels(self, sem_seg: torch.Tensor, file_name: str) -> np.ndarray:
        if sem_seg.dim() == 3:
            if sem_seg.shape[0] != self._num_classes:
                raise ValueError(
                    f"Image {file_name}: sem_seg has {sem_seg.shape[0]} score channels but "
                    f"dataset '{self._dataset_name}' has {self._num_classes} classes."
                )
            return sem_seg.argmax(dim=0).cpu().numpy().astype(np.int64)
        if sem_seg.dim() != 2 or sem_seg.is_floating_point():
            raise ValueError(
                f"Image {file_name}: sem_seg must be C x H x W scores or an H x W integer label "
                f"map, got a {tuple(sem_seg.shape)} {sem_seg.dtype} tensor."
            )
        labels = sem_seg.cpu().numpy().astype(np.int64)
        bad = (labels < 0) | (labels >= self._num_classes)
        if bad.any():
            raise ValueError(
                f"Image {file_name}: sem_seg label map contains class id {int(labels[bad][0])}, "
                f"outside [0, {self._num_classes}) of dataset '{self._dataset_name}'."
            )
        return labels

    def _load_ground_truth(self, file_name: str) -> np.ndarray:
        if file_name not in self._gt_files:
            raise ValueError(
                f"Image {file_name} is not in dataset '{self._dataset_name}'; evaluate a model "
                "on the dataset the evaluator was built for."
            )
        gt_file = self._gt_files[file_name]
        if gt_file is None:
            raise ValueError(
                f"Image {file_name} of dataset '{self._dataset_name}' has no `sem_seg_file_name`."
            )
        with PathManager.open(gt_file, "rb") as f:
            gt = np.asarray(Image.open(f), dtype=np.int64)
        bad = (gt != self._ignore_label) & ((gt < 0) | (gt >= self._num_classes))
        if bad.any():
            raise ValueError(
                f"Ground truth {gt_file} contains label {int(gt[bad][0])}, neither a class id "
                f"in [0, {self._num_classes}) nor ignore_label {self._ignore_label}."
            )
        return gt

    def evaluate(self) -> Optional[Dict[str, Dict[str, float]]]:
        self._close_raw_file()
        per_rank = gather_to_main(self._confusion, self._distributed)
        if per_rank is None:
            return None
        confusion = np.sum(per_rank, axis=0)
        overall = semantic_metrics(confusion)
        summary = OrderedDict()
        summary["mIoU"] = 100 * overall["mIoU"]
        summary["fwIoU"] = 100 * overall["fwIoU"]
        for class_id, name in enumerate(self._class_names):
            summary[f"IoU-{name}"] = 100 * overall["IoU"][class_id]
        summary["mACC"] = 100 * overall["mACC"]
        summary["pACC"] = 100 * overall["pACC"]
        for class_id, name in enumerate(self._class_names):
            summary[f"ACC-{name}"] = 100 * overall["ACC"][class_id]
        rows = [["All"] + [100 * overall[k] for k in ("mIoU", "fwIoU", "mACC", "pACC")]]
        for split, ids in self._splits.items():
            subset = semantic_metrics(confusion, ids)
            for key in ("mIoU", "fwIoU", "mACC", "pACC"):
                summary[f"{key}_{split}"] = 100 * subset[key]
            rows.append([split] + [100 * subset[k] for k in ("mIoU", "fwIoU", "mACC", "pACC")])

        self.log_table("Semantic segmentation", rows, ["", "mIoU", "fwIoU", "mACC", "pACC"])
        self.log_table(
            "Semantic segmentation per class",
            [
                [name, 100 * overall["IoU"][i], 100 * overall["ACC"][i]]
                for i, name in enumerate(self._class_names)
            ],
            ["class", "IoU", "ACC"],
        )
        self.save_metrics({"summary": summary, "confusion": confusion})
        return OrderedDict({self.result_key: summary})
