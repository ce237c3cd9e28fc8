"""COCO / LVIS instance-segmentation AP with per-split columns.

AP is computed by the reference implementations (pycocotools `COCOeval` for COCO-format ground
truth, the `lvis` package's `LVISEval` for LVIS-format ground truth, which adds APr / APc / APf),
so numbers are the official ones. Per-split columns (AP_seen, AP_unseen, ...) are the mean of
the per-class AP over the classes of each `class_splits` subset; a class without ground truth
in the evaluated images has an undefined (NaN) AP and is left out of every mean.
All AP values are reported in percent, as detectron2 does.
"""

import contextlib
import io
import logging
import os
import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data.datasets.coco import convert_to_coco_json
from detectron2.utils.file_io import PathManager
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .base import SplitAwareEvaluator, contiguous_class_names, split_means

__all__ = [
    "InstanceSegEvaluator",
    "encode_instance_masks",
    "ground_truth_json",
    "is_lvis_format",
    "load_coco_api",
    "predicted_instances",
]

logger = logging.getLogger(__name__)


def ground_truth_json(metadata, dataset_name: str, output_dir: Optional[str]) -> str:
    """Local path of the dataset's COCO- or LVIS-format ground truth.

    Uses metadata `json_file`; datasets registered without one are converted from their
    dataset dicts with detectron2's `convert_to_coco_json` (cached in `output_dir`).
    """
    json_file = metadata.get("json_file", None)
    if json_file:
        return PathManager.get_local_path(json_file)
    cache_dir = output_dir or tempfile.mkdtemp(prefix="openseg_eval_")
    cache_file = os.path.join(cache_dir, f"{dataset_name}_coco_format.json")
    logger.info(
        f"Dataset '{dataset_name}' has no metadata `json_file`; converting its dataset dicts "
        f"to COCO format at {cache_file}."
    )
    convert_to_coco_json(dataset_name, cache_file)
    return cache_file


def load_coco_api(json_file: str) -> COCO:
    """pycocotools COCO index of `json_file` (also reads LVIS-format files), without its prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(json_file)


def is_lvis_format(coco_gt: COCO) -> bool:
    """LVIS files mark category frequency groups and per-image negative categories."""
    categories = coco_gt.dataset.get("categories", [])
    images = coco_gt.dataset.get("images", [])
    return (bool(categories) and "frequency" in categories[0]) or (
        bool(images) and "neg_category_ids" in images[0]
    )


def predicted_instances(input_dict: dict, output: dict):
    """The CPU `instances` of one model output with bool `pred_masks` (binary float / uint8
    masks, as Mask2Former emits, are converted), after checking they match the image size.

    A mask of another size than the dataset dict's (height, width) means post-processing did not
    resize to the original image, and every IoU would be meaningless.
    """
    if "instances" not in output:
        raise ValueError(
            f"Model output for {input_dict.get('file_name')} has no 'instances'; instance "
            "evaluators need `instances` with pred_masks, scores and pred_classes."
        )
    instances = output["instances"].to("cpu")
    expected = (int(input_dict["height"]), int(input_dict["width"]))
    mask_size = tuple(int(s) for s in instances.pred_masks.shape[-2:])
    if len(instances) and mask_size != expected:
        raise ValueError(
            f"pred_masks of {input_dict.get('file_name')} have size {mask_size} (H, W) but the "
            f"image is {expected}; resize predictions to the original image size "
            "(detectron2's `sem_seg_postprocess` / `detector_postprocess`) before evaluating."
        )
    masks = instances.pred_masks
    if masks.dtype != torch.bool:
        if not ((masks == 0) | (masks == 1)).all():
            raise ValueError(
                f"pred_masks of {input_dict.get('file_name')} are {masks.dtype} with values "
                "other than 0 and 1; threshold soft masks in post-processing (instance "
                "evaluators expect binary masks)."
            )
        instances.pred_masks = masks > 0
    return instances


def encode_instance_masks(masks: torch.Tensor) -> List[dict]:
    """Compressed RLEs (counts as str, JSON-ready) of a bool [N, H, W] CPU tensor.

    pycocotools wants a Fortran-ordered [H, W, N] uint8 array: a C-contiguous [N, W, H] copy
    viewed transposed is exactly that, and is cheaper than `np.asfortranarray` on [H, W, N].
    """
    if len(masks) == 0:
        return []
    column_major = masks.transpose(1, 2).contiguous().numpy().view(np.uint8).transpose(2, 1, 0)
    rles = mask_util.encode(column_major)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _mean_valid(values: np.ndarray) -> float:
    """Mean of the entries > -1 (pycocotools / lvis mark undefined entries with -1); NaN if none."""
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else float("nan")


class InstanceSegEvaluator(SplitAwareEvaluator):
    """Mask AP of `instances` predictions (Lin et al. ECCV 2014 COCO protocol; LVIS protocol of
    Gupta et al. CVPR 2019 for LVIS-format ground truth), plus AP per class subset.

    Per image, predictions are encoded as RLE with dataset category ids and recorded (the raw
    file under `output_dir` holds exactly the COCO result entries). Only the images that were
    processed are evaluated.
    """

    result_key = "segm"

    def __init__(
        self, dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True
    ):
        super().__init__(dataset_name, output_dir=output_dir, distributed=distributed)
        self._json_file = ground_truth_json(self._metadata, dataset_name, output_dir)
        self._coco_gt = load_coco_api(self._json_file)
        self._lvis_format = is_lvis_format(self._coco_gt)
        id_map = self._metadata.get("thing_dataset_id_to_contiguous_id", None)
        if not id_map:
            raise ValueError(
                f"Dataset '{dataset_name}' has no metadata `thing_dataset_id_to_contiguous_id`; "
                "it is needed to map predicted classes back to the ids of "
                f"{self._json_file}."
            )
        self._contiguous_to_dataset_id = {int(c): int(d) for d, c in id_map.items()}
        self._class_names = contiguous_class_names(self._metadata)

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        for input_dict, output in zip(inputs, outputs):
            image_id = input_dict["image_id"]
            if image_id not in self._coco_gt.imgs:
                raise ValueError(
                    f"Image {input_dict.get('file_name')} has image_id {image_id}, which is not "
                    f"an image of {self._json_file}."
                )
            instances = predicted_instances(input_dict, output)
            classes = instances.pred_classes.tolist()
            unknown = sorted(set(classes) - set(self._contiguous_to_dataset_id))
            if unknown:
                raise ValueError(
                    f"Predictions for {input_dict.get('file_name')} (image_id {image_id}) have "
                    f"class ids {unknown}, which are not contiguous ids of dataset "
                    f"'{self._dataset_name}' (valid: {min(self._contiguous_to_dataset_id)}.."
                    f"{max(self._contiguous_to_dataset_id)})."
                )
            rles = encode_instance_masks(instances.pred_masks)
            scores = instances.scores.tolist()
            results = [
                {
                    "image_id": image_id,
                    "category_id": self._contiguous_to_dataset_id[cls],
                    "segmentation": rle,
                    "score": score,
                }
                for cls, rle, score in zip(classes, rles, scores)
            ]
            self.record({"image_id": image_id, "instances": results})

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        records = self.gathered_records()
        if records is None:
            return {}
        image_ids = sorted({r["image_id"] for r in records})
        results = [inst for r in records for inst in r["instances"]]
        if not image_ids:
            self._logger.warning(f"{type(self).__name__} received no images; no metrics.")
            return {}
        if self._lvis_format:
            metrics, per_dataset_class = self._run_lvis(results, image_ids)
        else:
            metrics, per_dataset_class = self._run_coco(results, image_ids)

        num_classes = len(self._class_names)
        per_class = np.full(num_classes, np.nan)
        for contiguous_id, dataset_id in self._contiguous_to_dataset_id.items():
            per_class[contiguous_id] = per_dataset_class.get(dataset_id, float("nan"))
        splits = self.class_splits(num_classes)
        for split_name, value in split_means(per_class, ~np.isnan(per_class), splits).items():
            metrics[f"AP_{split_name}"] = value
        for contiguous_id in sorted(self._contiguous_to_dataset_id):
            metrics[f"AP-{self._class_names[contiguous_id]}"] = float(per_class[contiguous_id])

        summary = [k for k in metrics if "-" not in k]
        self.log_table("Instance segmentation AP (%)", [[metrics[k] for k in summary]], summary)
        self.log_table(
            "Per-class instance segmentation AP (%)",
            [[self._class_names[c], per_class[c]] for c in sorted(self._contiguous_to_dataset_id)],
            ["class", "AP"],
        )
        self.save_metrics(metrics)
        return {self.result_key: metrics}

    def _run_coco(self, results: List[dict], image_ids: List[int]):
        """COCOeval segm on the processed images; returns summary metrics, {dataset id: AP}."""
        with contextlib.redirect_stdout(io.StringIO()):
            if results:
                coco_dt = self._coco_gt.loadRes(results)
            else:
                # loadRes rejects an empty list; an index with no annotations gives AP 0 for
                # every class with ground truth.
                coco_dt = COCO()
                coco_dt.dataset = dict(self._coco_gt.dataset, annotations=[])
                coco_dt.createIndex()
            coco_eval = COCOeval(self._coco_gt, coco_dt, iouType="segm")
            coco_eval.params.imgIds = image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
        metrics = {n: _percent(coco_eval.stats[i]) for i, n in enumerate(names)}
        precision = coco_eval.eval["precision"]  # [IoU, recall, class, area, maxDets]
        per_class = {
            int(cat_id): 100 * _mean_valid(precision[:, :, k, 0, -1])
            for k, cat_id in enumerate(coco_eval.params.catIds)
        }
        return metrics, per_class

    def _run_lvis(self, results: List[dict], image_ids: List[int]):
        """LVISEval segm on the processed images; returns summary metrics, {dataset id: AP}."""
        from lvis import LVIS, LVISEval, LVISResults

        lvis_gt = LVIS(self._json_file)
        if results:
            lvis_dt = LVISResults(lvis_gt, results)
        else:
            # LVISResults rejects an empty list; build the same index with no annotations so
            # that "no predictions" yields AP 0 for every class with ground truth.
            lvis_dt = LVISResults.__new__(LVISResults)
            lvis_dt.logger = logging.getLogger("lvis")
            lvis_dt.dataset = dict(lvis_gt.dataset, annotations=[])
            lvis_dt._create_index()
        lvis_eval = LVISEval(lvis_gt, lvis_dt, iou_type="segm")
        lvis_eval.params.img_ids = image_ids
        with _numpy_float_alias():
            lvis_eval.run()
        names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"]
        metrics = {n: _percent(lvis_eval.results[n]) for n in names}
        precision = lvis_eval.eval["precision"]  # [IoU, recall, class, area]
        per_class = {
            int(cat_id): 100 * _mean_valid(precision[:, :, k, 0])
            for k, cat_id in enumerate(lvis_eval.params.cat_ids)
        }
        return metrics, per_class


def _percent(value: float) -> float:
    """pycocotools / lvis summaries use -1 for "undefined"; report NaN instead of -100."""
    return float("nan") if value < 0 else 100 * float(value)


@contextlib.contextmanager
def _numpy_float_alias():
    """lvis 0.5.3 calls `np.float`, an alias NumPy 1.24 removed; provide it only while LVISEval
    runs."""
    had_alias = "float" in np.__dict__
    if not had_alias:
        np.float = float
    try:
        yield
    finally:
        if not had_alias:
            del np.float
