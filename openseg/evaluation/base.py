"""Plumbing shared by every openseg evaluator: class splits, DDP gathering, raw per-image
records on disk, result tables and the metrics JSON.

Each evaluator computes a small, JSON-serialisable record per image in `process`, hands it to
`SplitAwareEvaluator.record` (kept in memory and appended to
`<output_dir>/<result_key>_raw/rank<r>.jsonl`, so an interrupted run can be inspected), then in
`evaluate` calls `gather_to_main` / `gathered_records`, reduces, and reports with `log_table` and
`save_metrics`. Metrics per class subset (PQ_seen, mIoU_unseen, AR_known, ...) are averages over
the classes listed in the dataset metadata `class_splits`.
"""
import itertools
import json
import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from tabulate import tabulate

from ..utils.io import atomic_write_text

__all__ = [
    "SplitAwareEvaluator",
    "check_ground_truth_size",
    "class_splits_from_metadata",
    "contiguous_class_names",
    "gather_to_main",
    "split_means",
    "to_jsonable",
]


def contiguous_class_names(metadata) -> List[str]:
    """Names indexed by contiguous class id.

    openseg follows Mask2Former's convention: `stuff_classes` lists every class (things and
    stuff) in contiguous-id order; datasets without stuff fall back to `thing_classes`.
    """
    names = metadata.get("stuff_classes", None) or metadata.get("thing_classes", None)
    if not names:
        raise ValueError(
            f"Dataset '{metadata.name}' has neither `stuff_classes` nor `thing_classes` in its "
            "metadata; set them when registering the dataset."
        )
    return list(names)


def class_splits_from_metadata(metadata, num_classes: int) -> Dict[str, np.ndarray]:
    """Validated `class_splits` of a dataset: subset name -> sorted contiguous class ids.

    Missing `class_splits` means no subsets (an empty dict). Ids outside [0, num_classes) are an
    error, since a silently dropped class would skew every subset average.
    """
    raw = metadata.get("class_splits", None)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"Dataset '{metadata.name}': metadata `class_splits` must be a dict such as "
            f'{{"seen": [...], "unseen": [...]}}, got {type(raw).__name__}.'
        )
    splits = {}
    for split_name, ids in raw.items():
        ids = np.asarray(sorted(int(i) for i in ids), dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= num_classes)]
        if bad.size:
            raise ValueError(
                f"Dataset '{metadata.name}': metadata `class_splits['{split_name}']` contains "
                f"ids {bad.tolist()} outside the contiguous range [0, {num_classes}); "
                "class_splits must list contiguous class ids."
            )
        splits[str(split_name)] = ids
    return splits


def split_means(
    per_class: np.ndarray, valid: np.ndarray, splits: Mapping[str, np.ndarray]
) -> Dict[str, float]:
    """Mean of `per_class` over the valid classes of each subset (NaN if a subset has none)."""
    means = {}
    for split_name, ids in splits.items():
        selected = ids[valid[ids]]
        means[split_name] = float(np.mean(per_class[selected])) if selected.size else float("nan")
    return means


def gather_to_main(data: Any, distributed: bool) -> Optional[List[Any]]:
    """Gather `data` from all ranks onto the main process.

    Returns the list of per-rank objects on the main process and None elsewhere; without
    `distributed` it is `[data]` on every process. Must be called by all ranks.
    """
    if not distributed:
        return [data]
    comm.synchronize()
    gathered = comm.gather(data, dst=0)
    return gathered if comm.is_main_process() else None


def check_ground_truth_size(
    gt_shape: Sequence[int],
    pred_shape: Sequence[int],
    image_name: str,
    gt_file: str,
    record_hw: Optional[Sequence[int]] = None,
) -> None:
    """Raise naming the ground-truth file when its size differs from the prediction's.

    Models predict at the dataset dict's `height` x `width` (`record_hw`); when the
    prediction has that size, the ground-truth file is the odd one out (resized, or the label
    of another image), so the message says so instead of blaming the prediction."""
    gt_hw, pred_hw = tuple(int(v) for v in gt_shape[:2]), tuple(int(v) for v in pred_shape[:2])
    if gt_hw == pred_hw:
        return
    if record_hw is not None and tuple(int(v) for v in record_hw) == pred_hw:
        raise ValueError(
            f"Image {image_name}: ground truth {gt_file} has size {gt_hw} (height, width) but the "
            f"image has size {pred_hw} (its dataset dict's height/width, the size of the "
            f"prediction); the ground-truth file was resized or belongs to another image: "
            f"regenerate it with the dataset's prepare script."
        )
    raise ValueError(
        f"Image {image_name}: the prediction has size {pred_hw} (height, width) but ground truth "
        f"{gt_file} has size {gt_hw}; predictions must be at the ground-truth resolution (the "
        f"dataset dict's height/width)."
    )


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars / arrays (recursively) to plain Python for `json.dumps`."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class SplitAwareEvaluator(DatasetEvaluator):
    """Base for openseg evaluators: per-image records, gathering, split columns, reporting.

    Subclasses set `result_key` (the key of `evaluate()`'s result dict and the prefix of files
    in `output_dir`), call `super().reset()` in `reset`, `self.record(...)` per image in
    `process`, and in `evaluate` use `self.gathered_records()` (None on non-main ranks).
    """

    result_key: str = ""

    def __init__(
        self, dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True
    ):
        if not self.result_key:
            raise TypeError(f"{type(self).__name__} must set the class attribute `result_key`.")
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        self._output_dir = output_dir
        self._distributed = distributed
        self._logger = logging.getLogger(type(self).__module__)
        self._records: List[dict] = []
        self._raw_file = None

    # ------------------------------------------------------------------ class splits
    def class_splits(self, num_classes: int) -> Dict[str, np.ndarray]:
        """The dataset's validated `class_splits` (see `class_splits_from_metadata`)."""
        return class_splits_from_metadata(self._metadata, num_classes)

    # ------------------------------------------------------------------ raw records
    @property
    def raw_path(self) -> Optional[str]:
        """`<output_dir>/<result_key>_raw/rank<r>.jsonl`, or None without an output_dir."""
        if not self._output_dir:
            return None
        return os.path.join(
            self._output_dir, f"{self.result_key}_raw", f"rank{comm.get_rank()}.jsonl"
        )

    @property
    def metrics_path(self) -> Optional[str]:
        """`<output_dir>/<result_key>_metrics.json`, or None without an output_dir."""
        if not self._output_dir:
            return None
        return os.path.join(self._output_dir, f"{self.result_key}_metrics.json")

    def reset(self) -> None:
        """Forget records and truncate this rank's raw file. The main process first moves a
        previous run's metrics to `<result_key>_metrics.previous.json` and removes raw files
        of ranks this run does not have, so what sits under the current names always belongs
        to this evaluation (partial raw records until `evaluate` writes the metrics)."""
        self._close_raw_file()
        self._records = []
        if self._output_dir and comm.is_main_process():
            if os.path.exists(self.metrics_path):
                previous = self.metrics_path[: -len(".json")] + ".previous.json"
                os.replace(self.metrics_path, previous)
                self._logger.info("moved the previous evaluation's metrics to %s", previous)
            raw_dir = os.path.dirname(self.raw_path)
            for name in os.listdir(raw_dir) if os.path.isdir(raw_dir) else ():
                rank = re.fullmatch(r"rank(\d+)\.jsonl", name)
                if rank and int(rank.group(1)) >= comm.get_world_size():
                    os.remove(os.path.join(raw_dir, name))
        if self.raw_path is not None:
            PathManager.mkdirs(os.path.dirname(self.raw_path))
            self._raw_file = PathManager.open(self.raw_path, "w")

    def record(self, record: dict, keep: bool = True) -> None:
        """Append one image's result (one JSON line, flushed) to the raw file and, with
        `keep`, hold it for `gathered_records`; evaluators that reduce each image on the fly
        pass `keep=False`."""
        record = to_jsonable(record)
        if keep:
            self._records.append(record)
        if self._raw_file is not None:
            self._raw_file.write(json.dumps(record) + "\n")
            self._raw_file.flush()

    def _close_raw_file(self) -> None:
        if self._raw_file is not None:
            self._raw_file.close()
            self._raw_file = None

    def gathered_records(self) -> Optional[List[dict]]:
        """All ranks' records in rank order on the main process; None on the other ranks."""
        self._close_raw_file()
        per_rank = gather_to_main(self._records, self._distributed)
        if per_rank is None:
            return None
        return list(itertools.chain.from_iterable(per_rank))

    # ------------------------------------------------------------------ reporting
    def log_table(
        self, title: str, rows: Sequence[Sequence[Any]], headers: Sequence[str]
    ) -> str:
        """Log (and return) a pipe table, the format detectron2 uses for its results."""
        table = tabulate(
            rows, headers=list(headers), tablefmt="pipe", floatfmt=".3f", numalign="right"
        )
        self._logger.info(f"{title} on {self._dataset_name}:\n{table}")
        return table

    def save_metrics(self, metrics: Mapping[str, Any]) -> Optional[str]:
        """Write `metrics` to `<output_dir>/<result_key>_metrics.json` atomically (complete or
        absent); returns the path."""
        if not self._output_dir:
            return None
        atomic_write_text(self.metrics_path, json.dumps(to_jsonable(dict(metrics)), indent=1))
        return self.metrics_path
