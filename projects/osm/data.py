"""OSM's training mixture (Yu, Shen and Chen, Sec. 3.3 "Datasets" / "Training Protocols"):
several segmentation datasets (COCO / ADE20K / Cityscapes panoptic, LVIS instance, A-847 and
PC-459 semantic) sampled by configurable ratios, each record tagged with its dataset's name
so the model picks that dataset's class names and vocabulary-specific mode query.

The paper gives per-dataset batch sizes (COCO 32, LVIS 64, A-847 16, PC-459 8, ADE20K 16,
Cityscapes 8) and the release steps every dataset in each iteration with its own batch; here
the same shares are sampling ratios of one mixed batch (`MODEL.OSM.DATASET_RATIOS`), the
expected number of masks per dataset and iteration being the same.

Augmentation is the release's (train/data.py, the same for panoptic, instance and semantic
data): an image whose shorter side is below the input size S gets its longer side resized to
int(s * S), s ~ U[INPUT.MIN_SCALE, INPUT.MAX_SCALE] (bicubic image, nearest labels); larger
images keep their size; then a random horizontal flip and a random S x S crop padded with 0
(labels with "no segment" / the ignore label). Mappers `panoptic_osm`, `instance_osm`,
`semantic_osm` apply it; their test mapper is the plain resize of every mapper.
"""

import itertools
import logging
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.utils import comm
from PIL import Image
from torch.utils.data import Sampler

from openseg.data.mappers import (
    MAPPER_REGISTRY,
    InstanceDatasetMapper,
    PanopticDatasetMapper,
    SemanticDatasetMapper,
    build_mapper,
    dataset_ignore_label,
)
from openseg.engine.data import build_resumable_train_loader

__all__ = [
    "MixtureTrainingSampler",
    "OSMScaleJitter",
    "build_dataset_mappers",
    "build_mixture_train_loader",
    "build_osm_augmentation",
    "release_resize_hw",
]

logger = logging.getLogger(__name__)

OSM_PAD_VALUE = 0  # the release pads images with zeros (train/data.py)


def release_resize_hw(height: int, width: int, target: int) -> Tuple[int, int]:
    """Size after the release's `resize(size=target - 1, max_size=target)` (torchvision; a
    square image: `size=target`): the longer side becomes `target`, the shorter one is scaled
    and floored."""
    if height == width:
        return target, target
    short, long = min(height, width), max(height, width)
    new_short, new_long = target - 1, int((target - 1) * long / short)
    if new_long > target:
        new_short, new_long = int(target * new_short / new_long), target
    return (new_long, new_short) if height > width else (new_short, new_long)


class OSMScaleJitter(T.Augmentation):
    """The release's scale jitter: images whose shorter side is below `input_size` are
    resized (longer side int(s * input_size), s ~ U[min_scale, max_scale], bicubic); larger
    images are left as they are (train/data.py `parse_sample_*`)."""

    def __init__(self, input_size: int, min_scale: float, max_scale: float):
        super().__init__()
        self.input_size, self.min_scale, self.max_scale = input_size, min_scale, max_scale

    def get_transform(self, image: np.ndarray) -> T.Transform:
        height, width = image.shape[:2]
        if min(height, width) >= self.input_size:
            return T.NoOpTransform()
        target = int(np.random.uniform(self.min_scale, self.max_scale) * self.input_size)
        new_height, new_width = release_resize_hw(height, width, target)
        return T.ResizeTransform(height, width, new_height, new_width, Image.BICUBIC)


def build_osm_augmentation(cfg: CfgNode, ignore_label: int) -> List[T.Augmentation]:
    """Scale jitter, horizontal flip, random INPUT.IMAGE_SIZE crop padded with 0 (image) and
    `ignore_label` (semantic map), as the release (see the module docstring)."""
    size = cfg.INPUT.IMAGE_SIZE
    return [
        OSMScaleJitter(size, cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE),
        T.RandomFlip(horizontal=True, vertical=False),
        T.FixedSizeCrop(crop_size=(size, size), pad_value=OSM_PAD_VALUE, seg_pad_value=ignore_label),
    ]


def _osm_arguments(cfg: CfgNode, is_train: bool) -> dict:
    if not is_train:
        return {}
    return {"augmentations": build_osm_augmentation(cfg, dataset_ignore_label(cfg, is_train))}


@MAPPER_REGISTRY.register()
def panoptic_osm(cfg: CfgNode, is_train: bool) -> PanopticDatasetMapper:
    return PanopticDatasetMapper(cfg, is_train, **_osm_arguments(cfg, is_train))


@MAPPER_REGISTRY.register()
def instance_osm(cfg: CfgNode, is_train: bool) -> InstanceDatasetMapper:
    return InstanceDatasetMapper(cfg, is_train, **_osm_arguments(cfg, is_train))


@MAPPER_REGISTRY.register()
def semantic_osm(cfg: CfgNode, is_train: bool) -> SemanticDatasetMapper:
    return SemanticDatasetMapper(cfg, is_train, **_osm_arguments(cfg, is_train))


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
        self._seed = seed  # detectron2's name: the resumable loader saves and restores it
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()

    def _infinite_indices(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self._seed)
        while True:
            datasets = torch.multinomial(self.ratios, 1024, replacement=True, generator=generator)
            for d in datasets.tolist():
                yield self.offsets[d] + int(torch.randint(self.sizes[d], (1,), generator=generator))

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._infinite_indices(), self.rank, None, self.world_size)


def build_dataset_mappers(cfg: CfgNode) -> Dict[str, Callable[[Dict], Dict]]:
    """Training mapper of each of DATASETS.TRAIN: MODEL.OSM.DATASET_MAPPERS ([] =
    INPUT.DATASET_MAPPER_NAME for all), each built with its dataset alone as DATASETS.TRAIN so
    that it reads that dataset's ignore label (65535 for A-847 / PC-459, 255 for the others)."""
    names = list(cfg.DATASETS.TRAIN)
    mapper_names = list(cfg.MODEL.OSM.DATASET_MAPPERS) or [cfg.INPUT.DATASET_MAPPER_NAME] * len(names)
    if len(mapper_names) != len(names):
        raise ValueError(
            f"cfg.MODEL.OSM.DATASET_MAPPERS has {len(mapper_names)} entries for {len(names)} "
            f"DATASETS.TRAIN {names}: give one mapper name per dataset or none."
        )
    mappers = {}
    for name, mapper_name in zip(names, mapper_names):
        mapper_cfg = cfg.clone()
        mapper_cfg.defrost()
        mapper_cfg.INPUT.DATASET_MAPPER_NAME = mapper_name
        mapper_cfg.DATASETS.TRAIN = (name,)
        mappers[name] = build_mapper(mapper_cfg, is_train=True)
    return mappers


def build_mixture_train_loader(cfg: CfgNode):
    """The (resumable, openseg.engine.data) training loader of DATASETS.TRAIN mixed by
    MODEL.OSM.DATASET_RATIOS ([] = in proportion to their sizes), each dataset through its
    mapper (`build_dataset_mappers`); records carry `dataset_name`."""
    names = list(cfg.DATASETS.TRAIN)
    mappers = build_dataset_mappers(cfg)
    records: List[Dict] = []
    sizes = []
    for name in names:
        dicts = [dict(d, dataset_name=name) for d in DatasetCatalog.get(name)]
        records += dicts
        sizes.append(len(dicts))
    ratios = list(cfg.MODEL.OSM.DATASET_RATIOS) or [float(s) for s in sizes]
    if len(ratios) != len(names):
        raise ValueError(
            f"cfg.MODEL.OSM.DATASET_RATIOS has {len(ratios)} entries for {len(names)} DATASETS.TRAIN {names}."
        )
    logger.info("OSM training mixture: " + ", ".join(f"{n} ({s} images, ratio {r})" for n, s, r in zip(names, sizes, ratios)))
    return build_resumable_train_loader(
        cfg,
        _DatasetMapper(mappers),
        dataset=records,
        sampler=MixtureTrainingSampler(sizes, ratios, seed=cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()),
    )


class _DatasetMapper:
    """Maps a mixture record with the mapper of its `dataset_name` (picklable for workers)."""

    def __init__(self, mappers: Dict[str, Callable[[Dict], Dict]]):
        self.mappers = mappers

    def __call__(self, record: Dict) -> Dict:
        return self.mappers[record["dataset_name"]](record)
