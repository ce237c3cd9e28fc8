"""OSM's training mixture (Yu, Shen and Chen, Sec. 3.3 "Datasets" / "Training Protocols"):
several segmentation datasets (COCO / ADE20K / Cityscapes panoptic, LVIS instance, A-847 and
PC-459 semantic) sampled by configurable ratios, each record tagged with its dataset's name
so the model picks that dataset's class names and vocabulary-specific mode query.

The paper gives per-dataset batch sizes (COCO 32, LVIS 64, A-847 16, PC-459 8, ADE20K 16,
Cityscapes 8) and the release steps every dataset in each iteration with its own batch; here
the same shares are sampling ratios of one mixed batch (`MODEL.OSM.DATASET_RATIOS`), the
expected number of masks per dataset and iteration being the same.
"""

import itertools
import logging
from typing import Dict, Iterator, List, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.utils import comm
from torch.utils.data import Sampler

from openseg.data.mappers import build_mapper

__all__ = ["MixtureTrainingSampler", "build_mixture_train_loader"]

logger = logging.getLogger(__name__)


class MixtureTrainingSampler(Sampler):
    """Infinite stream of indices into the concatenation of datasets of `sizes`: each index
    first draws a dataset with probability proportional to `ratios`, then one of its records
    uniformly. Shared seed, every rank takes its own slice (as detectron2's TrainingSampler)."""

    def __init__(self, sizes: Sequence[int], ratios: Sequence[float], seed: int = 0):
        if len(sizes) != len(ratios) or any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise ValueError(f"dataset ratios {list(ratios)} must be non-negative, one per dataset {list(sizes)}.")
        if any(s == 0 for s, r in zip(sizes, ratios) if r > 0):
            raise ValueError(f"a dataset with a positive ratio is empty (sizes {list(sizes)}).")
        self.sizes = list(sizes)
        self.offsets = [0] + list(itertools.accumulate(sizes))[:-1]
        self.ratios = torch.tensor(ratios, dtype=torch.float64)
        self.seed = seed
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()

    def _infinite_indices(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            datasets = torch.multinomial(self.ratios, 1024, replacement=True, generator=generator)
            for d in datasets.tolist():
                yield self.offsets[d] + int(torch.randint(self.sizes[d], (1,), generator=generator))

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._infinite_indices(), self.rank, None, self.world_size)


def build_mixture_train_loader(cfg: CfgNode):
    """The training loader of DATASETS.TRAIN mixed by MODEL.OSM.DATASET_RATIOS ([] = in
    proportion to their sizes), each dataset through its mapper of MODEL.OSM.DATASET_MAPPERS
    ([] = INPUT.DATASET_MAPPER_NAME for all); records carry `dataset_name`."""
    names = list(cfg.DATASETS.TRAIN)
    osm = cfg.MODEL.OSM
    mapper_names = list(osm.DATASET_MAPPERS) or [cfg.INPUT.DATASET_MAPPER_NAME] * len(names)
    if len(mapper_names) != len(names):
        raise ValueError(
            f"cfg.MODEL.OSM.DATASET_MAPPERS has {len(mapper_names)} entries for {len(names)} "
            f"DATASETS.TRAIN {names}: give one mapper name per dataset or none."
        )
    records: List[Dict] = []
    sizes = []
    for name in names:
        dicts = [dict(d, dataset_name=name) for d in DatasetCatalog.get(name)]
        records += dicts
        sizes.append(len(dicts))
    ratios = list(osm.DATASET_RATIOS) or [float(s) for s in sizes]
    if len(ratios) != len(names):
        raise ValueError(
            f"cfg.MODEL.OSM.DATASET_RATIOS has {len(ratios)} entries for {len(names)} DATASETS.TRAIN {names}."
        )
    mappers = {}
    for name, mapper_name in zip(names, mapper_names):
        mapper_cfg = cfg.clone()
        mapper_cfg.defrost()
        mapper_cfg.INPUT.DATASET_MAPPER_NAME = mapper_name
        mappers[name] = build_mapper(mapper_cfg, is_train=True)
    logger.info("OSM training mixture: " + ", ".join(f"{n} ({s} images, ratio {r})" for n, s, r in zip(names, sizes, ratios)))
    return build_detection_train_loader(
        dataset=records,
        mapper=lambda record: mappers[record["dataset_name"]](record),
        sampler=MixtureTrainingSampler(sizes, ratios, seed=comm.shared_random_seed()),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
