"""Dataset mappers: a dataset dict -> the model's input dict.

Mask classification (Mask2Former, Cheng et al. CVPR 2022, Sec. 3) trains every task on a set
of (class, binary mask) pairs, so all training mappers here produce the same target:
`instances` with `gt_classes` (int64), `gt_masks` (bool [N, H, W]) and `gt_boxes` (tight
boxes of the masks), plus a `sem_seg` map (long, ignore 255) when one is available. Panoptic
targets come from the panoptic PNG, instance targets from COCO polygons / RLE, semantic
targets are one mask per class present (Mask2Former App. A). Crowd segments are dropped and
so are masks that augmentation cropped away.

Augmentation: the standard recipe (ResizeShortestEdge, optional crop, flip) or large-scale
jitter (LSJ: ResizeScale + FixedSizeCrop, Ghiasi et al. CVPR 2021; Mask2Former's COCO
recipe). At test time images are only resized (MIN_SIZE_TEST / MAX_SIZE_TEST); evaluators
read the ground truth from the files named in the dict.
"""

import copy
from abc import ABC, abstractmethod
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform
from detectron2.structures import BitMasks, Instances
from detectron2.utils.registry import Registry
from panopticapi.utils import rgb2id
from pycocotools import mask as mask_util

from ..config import oracles_enabled

IGNORE_LABEL = 255
IMAGE_PAD_VALUE = 128  # as detectron2's FixedSizeCrop

MAPPER_REGISTRY = Registry("OPENSEG_MAPPER")
MAPPER_REGISTRY.__doc__ = """Factories `(cfg, is_train) -> mapper`, chosen by
cfg.INPUT.DATASET_MAPPER_NAME (the factory's name)."""


class DataFileError(OSError):
    """An image or annotation file that is missing or cannot be decoded."""


class AnnotationError(ValueError):
    """A dataset dict or annotation lacking a key the mapper needs, or holding a bad value."""


def read_file(file_name: str, image_format: Optional[str] = None) -> np.ndarray:
    """detectron2's `read_image`, with failures re-raised naming the file."""
    try:
        return utils.read_image(file_name, format=image_format)
    except (OSError, ValueError, SyntaxError) as error:
        raise DataFileError(f"Cannot read {file_name}: {error}") from error


def required(record: dict, key: str, source: str):
    """`record[key]`, or an AnnotationError naming the key and where the record came from."""
    if key not in record:
        raise AnnotationError(
            f"{source}: missing key {key!r} (present: {sorted(record)}); the dataset loader "
            f"must provide it."
        )
    return record[key]


def panoptic_to_semantic(
    pan_ids: np.ndarray,
    segments_info: Sequence[dict],
    category_map: Optional[Dict[int, int]] = None,
    ignore_label: int = IGNORE_LABEL,
) -> np.ndarray:
    """Semantic map (uint8) of a panoptic id map: each segment's pixels get its category
    (mapped through `category_map` when given); crowd segments keep their class; pixels of
    no segment get `ignore_label`."""
    semantic = np.full(pan_ids.shape, ignore_label, np.uint8)
    for segment in segments_info:
        category = segment["category_id"]
        if category_map is not None:
            if category not in category_map:
                raise AnnotationError(
                    f"segment {segment['id']} has category_id {category}, which is not among "
                    f"the dataset's categories {sorted(category_map)}."
                )
            category = category_map[category]
        semantic[pan_ids == segment["id"]] = category
    return semantic


def transform_masks(
    transforms: T.TransformList, masks: np.ndarray, output_hw: Tuple[int, int]
) -> np.ndarray:
    """Apply the geometric `transforms` to binary masks [N, H, W] with the segmentation
    (nearest) path the semantic map takes, so both stay pixel-aligned. Padding (value 255 in
    FixedSizeCrop) is background."""
    if len(masks) == 0:
        return np.zeros((0, *output_hw), bool)
    return np.stack([transforms.apply_segmentation(m.astype(np.uint8)) == 1 for m in masks])


def build_standard_augmentation(
    cfg: CfgNode, category_area_constraint: bool
) -> List[T.Augmentation]:
    """ResizeShortestEdge, optional random crop, optional SSD colour jitter
    (INPUT.COLOR_AUG_SSD), flip (Mask2Former's ADE20K / Cityscapes recipe).

    With `category_area_constraint` the crop avoids windows where one class covers more than
    INPUT.CROP.SINGLE_CATEGORY_MAX_AREA of the pixels (needs a semantic map)."""
    augmentations: List[T.Augmentation] = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        if category_area_constraint:
            augmentations.append(
                T.RandomCrop_CategoryAreaConstraint(
                    cfg.INPUT.CROP.TYPE,
                    cfg.INPUT.CROP.SIZE,
                    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                    IGNORE_LABEL,
                )
            )
        else:
            augmentations.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    if cfg.INPUT.COLOR_AUG_SSD:
        augmentations.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
    return augmentations + _flip(cfg)


def build_lsj_augmentation(cfg: CfgNode, ignore_label: int = IGNORE_LABEL) -> List[T.Augmentation]:
    """Large-scale jitter: flip, rescale the image to [MIN_SCALE, MAX_SCALE] x IMAGE_SIZE,
    then a random IMAGE_SIZE x IMAGE_SIZE crop, padded when smaller (Mask2Former, COCO: the
    image with 128 as detectron2's FixedSizeCrop, the semantic map with `ignore_label`)."""
    size = cfg.INPUT.IMAGE_SIZE
    return _flip(cfg) + [
        T.ResizeScale(
            min_scale=cfg.INPUT.MIN_SCALE,
            max_scale=cfg.INPUT.MAX_SCALE,
            target_height=size,
            target_width=size,
        ),
        T.FixedSizeCrop(
            crop_size=(size, size), pad_value=IMAGE_PAD_VALUE, seg_pad_value=ignore_label
        ),
    ]


def build_test_augmentation(cfg: CfgNode) -> List[T.Augmentation]:
    return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]


def _flip(cfg: CfgNode) -> List[T.Augmentation]:
    if cfg.INPUT.RANDOM_FLIP == "none":
        return []
    return [
        T.RandomFlip(
            horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
            vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
        )
    ]


def dataset_ignore_label(cfg: CfgNode, is_train: bool) -> int:
    """`ignore_label` of the first dataset of DATASETS.TRAIN (or TEST): 255, or 65535 for the
    16-bit label maps (ADE20K-847, PC-459)."""
    names = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
    return (
        MetadataCatalog.get(names[0]).get("ignore_label", IGNORE_LABEL) if names else IGNORE_LABEL
    )


class Targets(NamedTuple):
    """Training targets at the original resolution, before augmentation.

    `masks` None means "one mask per class of the transformed `semantic` map" (semantic
    segmentation); `semantic` None means the dict has no semantic map.
    """

    classes: List[int]
    masks: Optional[np.ndarray]
    semantic: Optional[np.ndarray]


class SegmentationDatasetMapper(ABC):
    """Shared reading, augmentation and output assembly; subclasses read the targets."""

    category_area_constraint = True  # the standard crop may use the semantic map

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List,
        image_format: str,
        ignore_label: int = IGNORE_LABEL,
        size_divisibility: int = -1,
        keep_ground_truth: bool = False,
    ):
        """
        Args:
            is_train: produce training targets; otherwise only the resized image.
            augmentations: detectron2 augmentations / transforms applied in order.
            image_format: PIL mode or "BGR" for the `image` tensor (cfg.INPUT.FORMAT).
            ignore_label: value of unlabelled pixels in `sem_seg`.
            size_divisibility: if > 0, pad training images and targets to a multiple of it.
            keep_ground_truth: at test time also produce `instances` (and `sem_seg`) of the
                resized image, for the ground-truth oracles (cfg.TEST.ORACLE).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.size_divisibility = size_divisibility
        self.keep_ground_truth = keep_ground_truth

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict:
        if is_train:
            augmentations = build_standard_augmentation(cfg, cls.category_area_constraint)
        else:
            augmentations = build_test_augmentation(cfg)
        return {
            "is_train": is_train,
            "augmentations": augmentations,
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": dataset_ignore_label(cfg, is_train),
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "keep_ground_truth": not is_train and oracles_enabled(cfg),
        }

    @abstractmethod
    def _targets(self, dataset_dict: dict, image_hw: Tuple[int, int]) -> Targets:
        """Read the training targets of `dataset_dict` (image of size `image_hw`)."""

    def _read_semantic(self, file_name: str, image_hw: Tuple[int, int]) -> np.ndarray:
        """A single-channel label map; uint8 stays uint8 (PIL nearest resize, as the masks),
        wider types become float32 (exact for ids < 2**24) for detectron2's torch resize."""
        label = read_file(file_name)
        if label.ndim == 3:
            label = label[:, :, 0]
        _check_hw(label, image_hw, file_name)
        return label if label.dtype == np.uint8 else label.astype(np.float32)

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)  # never alter the catalog's dicts
        file_name = required(dataset_dict, "file_name", "dataset dict")
        image = read_file(file_name, self.image_format)
        utils.check_image_size(dataset_dict, image)
        if not self.is_train and not self.keep_ground_truth:
            aug_input = T.AugInput(image)
            self.augmentations(aug_input)
            dataset_dict.pop("annotations", None)
            dataset_dict["image"] = _image_tensor(aug_input.image)
            return dataset_dict

        targets = self._targets(dataset_dict, image.shape[:2])
        dataset_dict.pop("annotations", None)
        aug_input = T.AugInput(image, sem_seg=targets.semantic)
        transforms = self.augmentations(aug_input)
        image, semantic = aug_input.image, aug_input.sem_seg
        height, width = image.shape[:2]
        if targets.masks is None:
            classes = [int(c) for c in np.unique(semantic) if c != self.ignore_label]
            masks = (
                np.stack([semantic == c for c in classes])
                if classes
                else np.zeros((0, height, width), bool)
            )
        else:
            classes = targets.classes
            masks = transform_masks(transforms, targets.masks, (height, width))
        # drop masks cropped away; an image left with none gets empty targets (as detectron2's
        # and Mask2Former's mappers give), never a reshape of a zero-size array
        keep = masks.any(axis=(1, 2)) if masks.size else np.zeros(len(masks), bool)

        image_tensor = _image_tensor(image)
        mask_tensor = torch.from_numpy(np.ascontiguousarray(masks[keep]))
        sem_tensor = None if semantic is None else torch.as_tensor(semantic.astype(np.int64))
        if self.size_divisibility > 0 and self.is_train:  # test images keep their size
            pad = _padding((height, width), self.size_divisibility)
            image_tensor = F.pad(image_tensor, pad, value=IMAGE_PAD_VALUE)
            mask_tensor = F.pad(mask_tensor, pad, value=False)
            if sem_tensor is not None:
                sem_tensor = F.pad(sem_tensor, pad, value=self.ignore_label)
        instances = Instances(tuple(image_tensor.shape[-2:]))
        instances.gt_classes = torch.tensor(
            [c for c, k in zip(classes, keep) if k], dtype=torch.int64
        )
        instances.gt_masks = mask_tensor
        instances.gt_boxes = BitMasks(mask_tensor).get_bounding_boxes()
        dataset_dict["image"] = image_tensor
        dataset_dict["instances"] = instances
        if sem_tensor is not None:
            dataset_dict["sem_seg"] = sem_tensor
        return dataset_dict


class PanopticDatasetMapper(SegmentationDatasetMapper):
    """Targets from the panoptic PNG (`pan_seg_file_name`, panopticapi RGB ids) and its
    `segments_info` (contiguous `category_id`); `sem_seg` from `sem_seg_file_name` or,
    without one, from the panoptic segments."""

    def _targets(self, dataset_dict: dict, image_hw: Tuple[int, int]) -> Targets:
        pan_file = required(dataset_dict, "pan_seg_file_name", dataset_dict["file_name"])
        segments = required(dataset_dict, "segments_info", dataset_dict["file_name"])
        pan_ids = rgb2id(read_file(pan_file, "RGB"))
        _check_hw(pan_ids, image_hw, pan_file)
        classes, masks = [], []
        for index, segment in enumerate(segments):
            source = f"{pan_file} segments_info[{index}]"
            segment_id = required(segment, "id", source)
            category = required(segment, "category_id", source)
            if segment.get("iscrowd", 0):
                continue
            classes.append(int(category))
            masks.append(pan_ids == segment_id)
        if "sem_seg_file_name" in dataset_dict:
            semantic = self._read_semantic(dataset_dict["sem_seg_file_name"], image_hw)
        else:
            semantic = panoptic_to_semantic(pan_ids, segments, ignore_label=self.ignore_label)
        return Targets(classes, np.array(masks, bool).reshape(-1, *image_hw), semantic)


class InstanceDatasetMapper(SegmentationDatasetMapper):
    """Targets from `annotations` (COCO polygons or RLE, contiguous `category_id`);
    `sem_seg` only when the dict names a `sem_seg_file_name`."""

    category_area_constraint = False  # instance dicts usually have no semantic map

    def _targets(self, dataset_dict: dict, image_hw: Tuple[int, int]) -> Targets:
        file_name = dataset_dict["file_name"]
        annotations = required(dataset_dict, "annotations", file_name)
        classes, masks = [], []
        for index, annotation in enumerate(annotations):
            source = f"{file_name} annotations[{index}]"
            if annotation.get("iscrowd", 0):
                continue
            category = required(annotation, "category_id", source)
            segmentation = required(annotation, "segmentation", source)
            classes.append(int(category))
            masks.append(decode_segmentation(segmentation, image_hw, source))
        semantic = None
        if "sem_seg_file_name" in dataset_dict:
            semantic = self._read_semantic(dataset_dict["sem_seg_file_name"], image_hw)
        return Targets(classes, np.array(masks, bool).reshape(-1, *image_hw), semantic)


class SemanticDatasetMapper(SegmentationDatasetMapper):
    """Targets from `sem_seg_file_name`: one mask per class present after augmentation,
    ignore pixels excluded (Mask2Former's semantic mask classification)."""

    def _targets(self, dataset_dict: dict, image_hw: Tuple[int, int]) -> Targets:
        sem_file = required(dataset_dict, "sem_seg_file_name", dataset_dict["file_name"])
        return Targets([], None, self._read_semantic(sem_file, image_hw))


def decode_segmentation(segmentation, image_hw: Tuple[int, int], source: str) -> np.ndarray:
    """Binary mask of a COCO segmentation: polygons, compressed or uncompressed RLE, or an
    array mask already."""
    height, width = image_hw
    if isinstance(segmentation, np.ndarray):
        mask = segmentation.astype(bool)
    else:
        try:
            if isinstance(segmentation, list):
                rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
                rle = mask_util.frPyObjects(segmentation, *segmentation["size"])
            elif isinstance(segmentation, dict):
                rle = segmentation
            else:
                raise TypeError(f"unsupported type {type(segmentation).__name__}")
            mask = mask_util.decode(rle).astype(bool)
        except (TypeError, ValueError, KeyError, IndexError) as error:
            raise AnnotationError(
                f"{source}: cannot decode 'segmentation' ({error}); expected COCO polygons "
                f"or RLE."
            ) from error
    _check_hw(mask, image_hw, source)
    return mask


def _check_hw(array: np.ndarray, image_hw: Tuple[int, int], source: str) -> None:
    if tuple(array.shape[:2]) != tuple(image_hw):
        raise DataFileError(
            f"{source}: size {tuple(array.shape[:2])} differs from the image size {tuple(image_hw)}."
        )


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _padding(image_hw: Tuple[int, int], divisor: int) -> Tuple[int, int, int, int]:
    """F.pad arguments (left, right, top, bottom) reaching the next multiple of `divisor`."""
    height, width = image_hw
    return (0, -width % divisor, 0, -height % divisor)


def _lsj_arguments(cfg: CfgNode, is_train: bool) -> dict:
    if not is_train:
        return {}
    return {"augmentations": build_lsj_augmentation(cfg, dataset_ignore_label(cfg, is_train))}


@MAPPER_REGISTRY.register()
def panoptic(cfg: CfgNode, is_train: bool) -> PanopticDatasetMapper:
    return PanopticDatasetMapper(cfg, is_train)


@MAPPER_REGISTRY.register()
def panoptic_lsj(cfg: CfgNode, is_train: bool) -> PanopticDatasetMapper:
    return PanopticDatasetMapper(cfg, is_train, **_lsj_arguments(cfg, is_train))


@MAPPER_REGISTRY.register()
def instance(cfg: CfgNode, is_train: bool) -> InstanceDatasetMapper:
    return InstanceDatasetMapper(cfg, is_train)


@MAPPER_REGISTRY.register()
def instance_lsj(cfg: CfgNode, is_train: bool) -> InstanceDatasetMapper:
    return InstanceDatasetMapper(cfg, is_train, **_lsj_arguments(cfg, is_train))


@MAPPER_REGISTRY.register()
def semantic(cfg: CfgNode, is_train: bool) -> SemanticDatasetMapper:
    return SemanticDatasetMapper(cfg, is_train)


def build_mapper(cfg: CfgNode, is_train: bool):
    """The mapper named by cfg.INPUT.DATASET_MAPPER_NAME (see MAPPER_REGISTRY)."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in MAPPER_REGISTRY:
        raise KeyError(
            f"cfg.INPUT.DATASET_MAPPER_NAME={name!r} is not a registered mapper; choose one of "
            f"{sorted(name for name, _ in MAPPER_REGISTRY)}."
        )
    return MAPPER_REGISTRY.get(name)(cfg, is_train)


class ReferringDatasetMapper:
    """Referring-expression dicts (RefCOCO family: one referred object in `annotations`, its
    expressions in `sentences`) -> ``image``, ``sentences`` and the object's mask.

    Training: ResizeShortestEdge only (a flip or crop would falsify "left" / "right" / "top"
    in the expressions); ``instances`` holds the object's class and mask at the resized size.
    Test: the resized image plus ``gt_mask`` (bool [height, width], original resolution) for
    the referring evaluator.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, augmentations: List, image_format: str):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict:
        if is_train:
            augmentations = [
                T.ResizeShortestEdge(
                    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
                )
            ]
        else:
            augmentations = build_test_augmentation(cfg)
        return {"is_train": is_train, "augmentations": augmentations,
                "image_format": cfg.INPUT.FORMAT}

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = required(dataset_dict, "file_name", "dataset dict")
        sentences = required(dataset_dict, "sentences", file_name)
        if not sentences:
            raise AnnotationError(
                f"{file_name}: 'sentences' is empty (ref {dataset_dict.get('ref_id')})."
            )
        annotations = [a for a in required(dataset_dict, "annotations", file_name)
                       if not a.get("iscrowd", 0)]
        image = read_file(file_name, self.image_format)
        utils.check_image_size(dataset_dict, image)
        image_hw = image.shape[:2]
        masks = np.zeros((0, *image_hw), bool)
        if annotations:
            masks = np.stack(
                [decode_segmentation(a["segmentation"], image_hw, f"{file_name} annotation {i}")
                 for i, a in enumerate(annotations)]
            )
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        dataset_dict.pop("annotations")
        dataset_dict["image"] = _image_tensor(aug_input.image)
        dataset_dict["sentences"] = [str(s) for s in sentences]
        if not self.is_train:
            dataset_dict["gt_mask"] = torch.from_numpy(masks.any(axis=0))
            return dataset_dict
        height, width = aug_input.image.shape[:2]
        resized = torch.from_numpy(
            np.ascontiguousarray(transform_masks(transforms, masks, (height, width)))
        )
        instances = Instances((height, width))
        instances.gt_classes = torch.tensor(
            [int(a["category_id"]) for a in annotations], dtype=torch.int64
        )
        instances.gt_masks = resized
        instances.gt_boxes = BitMasks(resized).get_bounding_boxes()
        dataset_dict["instances"] = instances
        return dataset_dict


@MAPPER_REGISTRY.register()
def referring(cfg: CfgNode, is_train: bool) -> ReferringDatasetMapper:
    return ReferringDatasetMapper(cfg, is_train)
