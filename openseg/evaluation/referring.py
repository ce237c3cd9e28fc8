"""Referring-expression segmentation metrics (RefCOCO / RefCOCO+ / RefCOCOg protocol).

One predicted binary mask per referring expression is compared with the referred object's
mask. cIoU (cumulative IoU, Liu et al. ICCV 2017 / Yu et al. ECCV 2016 toolkits) is the total
intersection over the total union of all expressions, so large objects weigh more; mIoU
(also called gIoU) is the mean of per-expression IoUs; Prec@X is the fraction of expressions
whose IoU exceeds X.

Inputs must carry ``gt_mask`` (bool [H, W] at the original ``height`` x ``width``; the
"referring" mapper provides it) and ``sentences``; outputs carry ``ref_seg`` (bool
[S, H, W], one mask per sentence in input order).
"""

from typing import Dict, List, Optional

import numpy as np
import torch

from .base import SplitAwareEvaluator

__all__ = ["ReferringEvaluator", "referring_metrics", "PRECISION_THRESHOLDS"]

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def referring_metrics(intersections: np.ndarray, unions: np.ndarray) -> Dict[str, float]:
    """cIoU, mIoU and Prec@X (percent) from per-expression intersection / union pixel counts.

    An expression with an empty union (empty prediction of an empty target) has IoU 1.
    """
    intersections = np.asarray(intersections, dtype=np.float64)
    unions = np.asarray(unions, dtype=np.float64)
    if intersections.size == 0:
        raise ValueError("referring_metrics: no expressions were evaluated.")
    ious = np.where(unions > 0, intersections / np.maximum(unions, 1), 1.0)
    total_union = unions.sum()
    metrics = {
        "cIoU": 100.0 * (intersections.sum() / total_union if total_union > 0 else 1.0),
        "mIoU": 100.0 * float(ious.mean()),
    }
    for threshold in PRECISION_THRESHOLDS:
        metrics[f"Prec@{threshold:.1f}"] = 100.0 * float((ious > threshold).mean())
    metrics["num_expressions"] = int(intersections.size)
    return metrics


class ReferringEvaluator(SplitAwareEvaluator):
    """cIoU / mIoU / Prec@X of ``ref_seg`` outputs against the inputs' ``gt_mask``."""

    result_key = "referring"

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        for x, output in zip(inputs, outputs):
            source = f"image {x.get('image_id', '?')} of {self._dataset_name}"
            if "gt_mask" not in x:
                raise KeyError(
                    f"ReferringEvaluator: {source} has no 'gt_mask'; evaluate with the "
                    "'referring' test mapper (cfg.INPUT.DATASET_MAPPER_NAME='referring')."
                )
            if "ref_seg" not in output:
                raise KeyError(
                    f"ReferringEvaluator: the model's output for {source} has no 'ref_seg' "
                    "(one bool mask per sentence)."
                )
            target = torch.as_tensor(x["gt_mask"]).bool().cpu()
            predictions = torch.as_tensor(output["ref_seg"]).bool().cpu()
            if predictions.dim() == 2:
                predictions = predictions[None]
            if tuple(predictions.shape[-2:]) != tuple(target.shape):
                raise ValueError(
                    f"ReferringEvaluator: {source}: 'ref_seg' masks are "
                    f"{tuple(predictions.shape[-2:])} but 'gt_mask' is {tuple(target.shape)}; "
                    "predict at the input's height x width."
                )
            num_sentences = len(x.get("sentences", predictions))
            if predictions.shape[0] != num_sentences:
                raise ValueError(
                    f"ReferringEvaluator: {source}: {predictions.shape[0]} 'ref_seg' masks for "
                    f"{num_sentences} sentences."
                )
            intersections = (predictions & target).flatten(1).sum(1)
            unions = (predictions | target).flatten(1).sum(1)
            self.record(
                {
                    "image_id": x.get("image_id"),
                    "ref_id": x.get("ref_id"),
                    "intersection": intersections.tolist(),
                    "union": unions.tolist(),
                }
            )

    def evaluate(self) -> Optional[Dict[str, Dict[str, float]]]:
        records = self.gathered_records()
        if records is None:
            return None
        if not records:
            self._logger.warning(f"ReferringEvaluator: no predictions on {self._dataset_name}.")
            return {}
        intersections = np.concatenate([np.asarray(r["intersection"], float) for r in records])
        unions = np.concatenate([np.asarray(r["union"], float) for r in records])
        metrics = referring_metrics(intersections, unions)
        self.log_table(
            "Referring segmentation", [[metrics[k] for k in metrics]], headers=list(metrics)
        )
        self.save_metrics(metrics)
        return {self.result_key: metrics}
