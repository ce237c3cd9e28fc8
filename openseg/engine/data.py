"""A training data loader whose position can be saved and restored exactly.

detectron2's training loader is an infinite stream: a sampler gives each rank a seeded
sequence of dataset indices, images are grouped by aspect ratio and augmented with the
process's global random generators. Restarting it after a checkpoint replays the stream from
its beginning with fresh augmentation randomness, so a resumed run sees different images than
an uninterrupted one. Here:

- aspect-ratio grouping happens on the index stream (from the dataset dicts' `width` /
  `height`, the same rule as detectron2's `AspectRatioGroupedDataset`: landscape vs. the rest),
  so each rank's stream of images is a pure function of the sampler seed and its position;
- every image is mapped under generators seeded by (seed, position in the global index
  stream), so the augmentation depends neither on worker count, worker seeds, what ran
  before, nor on how many processes share the stream (N processes with batch B/N see the
  same augmented images as one with batch B);
- `ResumableTrainLoader.state_dict()` is the number of images this rank has consumed plus the
  seeds; `load_state_dict` makes the next batch the one an uninterrupted run would get.
"""
import contextlib
import itertools
import logging
import random
import signal
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import build_detection_train_loader
from detectron2.data.build import build_batch_data_loader
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler, get_worker_info

__all__ = ["PositionedSampler", "ResumableTrainLoader", "build_resumable_train_loader"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _seeded_generators(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU generators for the block, then put the
    previous states back (the training loop's own randomness is not disturbed)."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def _leave_stop_signals_to_the_main_process() -> None:
    """In a DataLoader worker: ignore SIGTERM / SIGUSR1. SLURM signals every process of a job;
    a worker that died of it would crash the main process before it could checkpoint (the
    main process ends its workers itself when it stops)."""
    if get_worker_info() is not None and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _position_seed(seed: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


class PositionedSampler(Sampler):
    """Wraps a per-rank infinite index sampler; yields `(position, index)` pairs, optionally
    grouped by aspect ratio into runs of `batch_size`, starting after `start` items."""

    def __init__(self, sampler: Sampler, batch_size: int, landscape: Optional[Sequence[bool]] = None):
        self.sampler = sampler
        self.batch_size = batch_size
        self.landscape = landscape
        self.start = 0

    def _stream(self) -> Iterator[Tuple[int, int]]:
        stream = enumerate(iter(self.sampler))
        if self.landscape is None:
            yield from stream
            return
        buckets: List[List[Tuple[int, int]]] = [[], []]
        for position, index in stream:
            bucket = buckets[0 if self.landscape[index] else 1]
            bucket.append((position, index))
            if len(bucket) == self.batch_size:
                yield from bucket
                bucket.clear()

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return itertools.islice(self._stream(), self.start, None)


class _PositionSeededDataset(Dataset):
    """Maps dataset dict `index` under generators seeded by (seed, global stream position);
    detectron2's samplers give rank r of w the global positions r, r + w, r + 2w, ..."""

    def __init__(self, dicts: List[dict], mapper: Callable[[dict], Any], seed: int):
        self._dicts = DatasetFromList(dicts, copy=False)
        self._mapper = mapper
        self.seed = seed
        self._rank, self._world_size = comm.get_rank(), comm.get_world_size()

    def __len__(self) -> int:
        return len(self._dicts)

    def __getitem__(self, item: Tuple[int, int]) -> Any:
        _leave_stop_signals_to_the_main_process()
        position, index = item
        seed = _position_seed(self.seed, position * self._world_size + self._rank)
        with _seeded_generators(seed):
            mapped = self._mapper(self._dicts[index])
            fallback = random.Random(seed)
            for _ in range(10):  # as detectron2's MapDataset: a mapper may skip an image (None)
                if mapped is not None:
                    return mapped
                index = fallback.randrange(len(self._dicts))
                mapped = self._mapper(self._dicts[index])
        if mapped is None:
            raise RuntimeError(f"the training mapper returned None for 11 images in a row (last: index {index})")
        return mapped


class ResumableTrainLoader:
    """Iterable of training batches with `state_dict` / `load_state_dict` (see module doc)."""

    def __init__(self, loader, sampler: PositionedSampler, dataset: _PositionSeededDataset):
        self._loader = loader
        self._sampler = sampler
        self._dataset = dataset
        self._consumed = 0

    def __iter__(self) -> Iterator[list]:
        for batch in self._loader:
            self._consumed += len(batch)
            yield batch

    def state_dict(self) -> Dict[str, int]:
        state = {"images_consumed": self._consumed, "seed": self._dataset.seed}
        if hasattr(self._sampler.sampler, "_seed"):
            state["sampler_seed"] = int(self._sampler.sampler._seed)
        return state

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue after `state["images_consumed"]` images; must precede the first batch."""
        self._consumed = self._sampler.start = int(state["images_consumed"])
        self._dataset.seed = int(state["seed"])
        if "sampler_seed" in state:
            self._sampler.sampler._seed = int(state["sampler_seed"])


def build_resumable_train_loader(
    cfg,
    mapper: Callable[[dict], Any],
    dataset: Optional[List[dict]] = None,
    sampler: Optional[Sampler] = None,
) -> ResumableTrainLoader:
    """detectron2's training loader for `cfg` (same dataset, sampler, batch size, aspect-ratio
    grouping and workers) made resumable; batches are lists of mapped dicts, as detectron2's.

    `dataset` and `sampler` (an infinite per-rank index sampler; a `_seed` attribute is saved
    and restored) replace those of DATASETS.TRAIN, for a meta-architecture's own mixture."""
    if (dataset is None) != (sampler is None):
        raise ValueError("build_resumable_train_loader: give both `dataset` and `sampler`, or neither.")
    if dataset is None:
        args = build_detection_train_loader.from_config(cfg, mapper=mapper)
    else:
        args = {
            "dataset": dataset,
            "sampler": sampler,
            "total_batch_size": cfg.SOLVER.IMS_PER_BATCH,
            "aspect_ratio_grouping": cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            "num_workers": cfg.DATALOADER.NUM_WORKERS,
        }
    dicts = args["dataset"]
    if not isinstance(dicts, list):
        raise TypeError("the resumable training loader needs a list of dataset dicts (DATASETS.TRAIN)")
    batch_size = args["total_batch_size"] // comm.get_world_size()
    landscape = None
    if args["aspect_ratio_grouping"]:
        if all("width" in d and "height" in d for d in dicts):
            landscape = [d["width"] > d["height"] for d in dicts]
        else:
            logger.info("dataset dicts without width/height: batches are not grouped by aspect ratio")
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    sampler = PositionedSampler(args["sampler"], batch_size, landscape)
    dataset = _PositionSeededDataset(dicts, mapper, seed)
    loader = build_batch_data_loader(
        dataset,
        sampler,
        args["total_batch_size"],
        aspect_ratio_grouping=False,
        num_workers=args["num_workers"],
        seed=seed,
    )
    return ResumableTrainLoader(loader, sampler, dataset)
