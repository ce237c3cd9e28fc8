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
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from tabulate import tabulate

__all__ = [
    "SplitAwareEvaluator",
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

    def reset(self) -> None:
        """Forget records and truncate this rank's raw file."""
        self._close_raw_file()
        self._records = []
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
        """Write `metrics` to `<output_dir>/<result_key>_metrics.json`; returns the path."""
        if not self._output_dir:
            return None
        PathManager.mkdirs(self._output_dir)
        path = os.path.join(self._output_dir, f"{self.result_key}_metrics.json")
        with PathManager.open(path, "w") as f:
            json.dump(to_jsonable(dict(metrics)), f, indent=1)
        return path
