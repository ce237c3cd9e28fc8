"""Open-ended recognition of given masks: Accuracy and Not-in-Vocabulary (OSM: Yu, Shen and
Chen, "Towards Open-Ended Visual Recognition with Large Language Model", Sec. 3.3, evaluation
with ground-truth masks).

A model that names masks freely (`instances.pred_texts`) is run on ground-truth masks (or on
proposals). Each predicted mask is assigned the ground-truth segment it overlaps with IoU >=
`iou_threshold` (ground-truth masks match their own segment with IoU 1); then

* Acc  - the share of matched masks whose name is the ground-truth class: exactly its class
         name or a synonym (dataset metadata `synonyms`), in singular or plural form, case,
         punctuation and spacing ignored (OSM Sec. 4, "Evaluation Protocols": "correct only
         when the predicted class name exactly matches", synonyms and plural / singular forms
         added). "a dog" or "two dogs" is not an exact match of "dog";
* NIV  - the share of matched masks whose name is none of the vocabulary's names (in
         singular or plural form) at all: the model answered outside the test vocabulary.

The release (test/evaluate_pred.py) adds suffix-rule plural / singular forms of the ground-truth
names only; here both the answer and the names are singularised (irregular plurals too). For NIV
the release compares the raw answer with the raw names, so a plural answer counts as correct and
as not-in-vocabulary at once; the paper defines NIV as answers outside the vocabulary, which
a plural class name is not, and that is what is computed here.

mAcc averages Acc per ground-truth class; Acc_<split> / NIV_<split> restrict to the masks of
each `class_splits` subset. Values are in percent.
"""

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.utils.file_io import PathManager
from PIL import Image

from openseg.data.vocab import get_vocabulary

from .base import SplitAwareEvaluator, contiguous_class_names
from .lexical import normalize_description, rule_singularize
from .panoptic import rgb_to_segment_ids

__all__ = [
    "GroundTruthSegments",
    "OpenEndedAccuracyEvaluator",
    "VocabularyMatcher",
    "match_to_ground_truth",
    "predicted_texts",
]


def predicted_texts(output: dict, file_name: str) -> Tuple[torch.Tensor, List[str]]:
    """(bool [N, H, W] CPU masks, N strings) of a model output's open-ended `instances`."""
    instances = output.get("instances")
    if instances is None or not instances.has("pred_texts"):
        raise ValueError(
            f"Model output for {file_name} has no `instances.pred_texts`; open-ended evaluators "
            "need one free-form name per predicted mask."
        )
    masks = instances.pred_masks.to("cpu")
    texts = list(instances.pred_texts)
    if len(texts) != len(masks):
        raise ValueError(
            f"Model output for {file_name}: {len(texts)} pred_texts for {len(masks)} pred_masks."
        )
    return (masks > 0.5) if masks.is_floating_point() else masks.bool(), texts


class GroundTruthSegments:
    """Ground-truth segments of a dataset's images as bool masks + contiguous classes.

    Panoptic ground truth (`pan_seg_file_name` + `segments_info`, crowd regions left out) when
    the dataset has it, else one segment per class of the semantic map (`sem_seg_file_name`).
    """

    def __init__(self, dataset_name: str, ignore_label: Optional[int] = None):
        self._dataset_name = dataset_name
        self._records = {r["file_name"]: r for r in DatasetCatalog.get(dataset_name)}
        self._ignore_label = ignore_label

    def __call__(self, file_name: str) -> Tuple[np.ndarray, np.ndarray]:
        """(bool [S, H, W] masks, [S] contiguous classes) of image `file_name`."""
        record = self._records.get(file_name)
        if record is None:
            raise ValueError(
                f"Image {file_name} is not in dataset '{self._dataset_name}'; evaluate a model "
                "on the dataset the evaluator was built for."
            )
        if "pan_seg_file_name" in record:
            with PathManager.open(record["pan_seg_file_name"], "rb") as f:
                id_map = rgb_to_segment_ids(np.asarray(Image.open(f).convert("RGB")))
            segments = [s for s in record.get("segments_info", []) if not s.get("iscrowd", 0)]
            masks = np.stack([id_map == s["id"] for s in segments]) if segments else None
            classes = np.array([s["category_id"] for s in segments], dtype=np.int64)
            if masks is None:
                masks = np.zeros((0,) + id_map.shape, dtype=bool)
            return masks, classes
        if "sem_seg_file_name" in record:
            with PathManager.open(record["sem_seg_file_name"], "rb") as f:
                labels = np.asarray(Image.open(f), dtype=np.int64)
            classes = np.unique(labels)
            if self._ignore_label is not None:
                classes = classes[classes != self._ignore_label]
            return labels[None] == classes[:, None, None], classes
        raise ValueError(
            f"Image {file_name} of dataset '{self._dataset_name}' has neither "
            "`pan_seg_file_name` nor `sem_seg_file_name`: no ground-truth segments to match."
        )


def match_to_ground_truth(
    pred_masks: np.ndarray, gt_masks: np.ndarray, gt_classes: np.ndarray, iou_threshold: float
) -> Tuple[np.ndarray, np.ndarray]:
    """For each predicted mask, the class of the ground-truth segment of highest IoU if that
    IoU >= `iou_threshold`, else -1; and that IoU. Masks are bool [N, H, W] / [S, H, W]."""
    num_pred = pred_masks.shape[0]
    if num_pred == 0 or gt_masks.shape[0] == 0:
        return np.full(num_pred, -1, dtype=np.int64), np.zeros(num_pred)
    if pred_masks.shape[1:] != gt_masks.shape[1:]:
        raise ValueError(
            f"Predicted masks have size {pred_masks.shape[1:]} but the ground truth "
            f"{gt_masks.shape[1:]}; resize predictions to the original image."
        )
    pred = pred_masks.reshape(num_pred, -1).astype(np.float32)
    gt = gt_masks.reshape(gt_masks.shape[0], -1).astype(np.float32)
    intersection = pred @ gt.T
    union = pred.sum(1)[:, None] + gt.sum(1)[None, :] - intersection
    iou = np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)
    best = iou.argmax(axis=1)
    best_iou = iou[np.arange(num_pred), best]
    classes = np.where(best_iou >= iou_threshold, gt_classes[best], -1)
    return classes.astype(np.int64), best_iou.astype(np.float64)


class VocabularyMatcher:
    """Which class (if any) a free-form name is: exact comparison with every class's names after
    `normalize_description` (case, punctuation, spacing) and singularisation of the last word
    of both sides ("Dogs" is "dog"; "the dog" is not)."""

    def __init__(
        self,
        vocabulary: Sequence[Sequence[str]],
        singularize: Callable[[str], str] = rule_singularize,
    ):
        self._singularize = singularize
        self.name_to_classes: Dict[str, List[int]] = {}
        for class_id, names in enumerate(vocabulary):
            for name in names:
                for form in {self.canonical(name), normalize_description(name)}:
                    ids = self.name_to_classes.setdefault(form, [])
                    if class_id not in ids:
                        ids.append(class_id)

    def canonical(self, text: str) -> str:
        return self._singularize(normalize_description(text))

    def classes_of(self, text: str) -> List[int]:
        """Class ids whose names `text` is (several when classes share a synonym)."""
        found = []
        for form in (self.canonical(text), normalize_description(text)):
            for class_id in self.name_to_classes.get(form, []):
                if class_id not in found:
                    found.append(class_id)
        return found


class OpenEndedAccuracyEvaluator(SplitAwareEvaluator):
    """Acc / mAcc / NIV of `instances.pred_texts` against matched ground-truth segments (see
    the module docstring); unmatched predictions are counted (`num_unmatched`) but not scored."""

    result_key = "open_ended"

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        iou_threshold: float = 0.5,
        singularize: Optional[Callable[[str], str]] = None,
    ):
        super().__init__(dataset_name, output_dir, distributed)
        self._class_names = contiguous_class_names(self._metadata)
        vocabulary = get_vocabulary(dataset_name)
        if len(vocabulary) != len(self._class_names):
            raise ValueError(
                f"Dataset '{dataset_name}': metadata `synonyms` has {len(vocabulary)} entries "
                f"for {len(self._class_names)} classes."
            )
        self._matcher = VocabularyMatcher(vocabulary, singularize or rule_singularize)
        self._iou_threshold = float(iou_threshold)
        self._ground_truth = GroundTruthSegments(
            dataset_name, self._metadata.get("ignore_label", None)
        )

    @classmethod
    def from_config(cls, cfg: CfgNode, dataset_name: str, output_dir: Optional[str] = None):
        return cls(dataset_name, output_dir=output_dir, iou_threshold=cfg.TEST.OPEN_ENDED.MATCH_IOU)

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        for model_input, output in zip(inputs, outputs):
            file_name = model_input["file_name"]
            masks, texts = predicted_texts(output, file_name)
            gt_masks, gt_classes = self._ground_truth(file_name)
            matched, _ = match_to_ground_truth(
                masks.numpy(), gt_masks, gt_classes, self._iou_threshold
            )
            self.record(
                {
                    "file_name": file_name,
                    "gt_classes": matched,
                    "texts": texts,
                    "named": [self._matcher.classes_of(text) for text in texts],
                }
            )

    def evaluate(self) -> Optional[Dict[str, Dict[str, float]]]:
        records = self.gathered_records()
        if records is None:
            return None
        gt, correct, outside = [], [], []
        num_unmatched = 0
        for record in records:
            for gt_class, named in zip(record["gt_classes"], record["named"]):
                if gt_class < 0:
                    num_unmatched += 1
                    continue
                gt.append(gt_class)
                correct.append(gt_class in named)
                outside.append(not named)
        gt = np.array(gt, dtype=np.int64)
        correct, outside = np.array(correct, dtype=bool), np.array(outside, dtype=bool)
        num_classes = len(self._class_names)
        metrics = OrderedDict(self._scores(gt, correct, outside, num_classes))
        for split, ids in self.class_splits(num_classes).items():
            keep = np.isin(gt, ids)
            subset = self._scores(gt[keep], correct[keep], outside[keep], num_classes)
            for key in ("Acc", "mAcc", "NIV"):
                metrics[f"{key}_{split}"] = subset[key]
        metrics["num_masks"] = len(gt)
        metrics["num_unmatched"] = num_unmatched
        self.log_table(
            "Open-ended recognition (%)",
            [[metrics[k] for k in metrics]],
            list(metrics),
        )
        self.save_metrics(metrics)
        return OrderedDict({self.result_key: metrics})

    @staticmethod
    def _scores(gt: np.ndarray, correct: np.ndarray, outside: np.ndarray, num_classes: int) -> dict:
        if gt.size == 0:
            return {"Acc": float("nan"), "mAcc": float("nan"), "NIV": float("nan")}
        per_class_total = np.bincount(gt, minlength=num_classes)
        per_class_correct = np.bincount(
            gt, weights=correct.astype(np.float64), minlength=num_classes
        )
        present = per_class_total > 0
        return {
            "Acc": 100 * float(correct.mean()),
            "mAcc": 100 * float(np.mean(per_class_correct[present] / per_class_total[present])),
            "NIV": 100 * float(outside.mean()),
        }
