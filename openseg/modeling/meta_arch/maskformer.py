"""Mask2Former-style meta-architecture (Cheng et al. CVPR 2022), class-aware or class-agnostic.

backbone -> pixel decoder (multi-scale features + per-pixel mask embeddings) -> masked-attention
transformer decoder (per-query class logits and mask logits) -> Hungarian-matched set loss in
training, semantic / panoptic / instance post-processing at test time (Sec. 4).

Methods built on it (FC-CLIP, SegPrompt, ...) subclass `OpenSegMaskFormer` and override only
the steps that differ: `prepare_targets`, `forward_heads`, `losses`, `postprocess` or
`inference_single_image`.

It computes what the release's `MaskFormer` meta-architecture computes (facebookresearch/
Mask2Former; `tests/test_reference_mask2former.py` compares every decoder layer, the three
post-processed outputs, the losses and the gradients); released checkpoints map onto it with
`openseg.checkpoint.mask2former.reference_to_openseg`. Known additions: instance outputs carry
boxes from their masks (the release leaves them zero) and `class_agnostic` / oracle switches.
"""
import logging
from typing import Dict, List, Set, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList
from torch import Tensor, nn

from ..inference import instance_inference, panoptic_inference, semantic_inference
from ..losses import SetCriterion
from ..mask_decoder import build_transformer_decoder
from ..matcher import HungarianMatcher
from ..oracles import (
    OracleSwitches,
    apply_oracles,
    ground_truth_at_output,
    ground_truth_of_input,
    relabel_panoptic,
)
from ..pixel_decoder import build_pixel_decoder

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class OpenSegMaskFormer(nn.Module):
    """Mask-classification segmentation model producing detectron2's standard outputs.

    Training input: detectron2 batched inputs with ``image`` (uint8 CHW in cfg.INPUT.FORMAT)
    and ``instances`` (``gt_classes`` [N], ``gt_masks`` bool [N, H, W] or BitMasks); returns
    the weighted losses. Inference returns per image ``sem_seg`` [K, H, W], ``panoptic_seg``
    ``(int32 [H, W], segments_info)`` and ``instances``, at the input's ``height`` x ``width``.
    With `class_agnostic`, every ground-truth segment is one class (0) and only ``instances``
    are produced, all with ``pred_classes`` 0 (the open-world baseline).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        pixel_decoder: nn.Module,
        transformer_decoder: nn.Module,
        criterion: SetCriterion,
        num_queries: int,
        object_mask_threshold: float,
        overlap_threshold: float,
        metadata,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        semantic_on: bool,
        panoptic_on: bool,
        instance_on: bool,
        test_topk_per_image: int,
        class_agnostic: bool = False,
        oracles: OracleSwitches = OracleSwitches(),
    ):
        """
        Args:
            backbone: detectron2 backbone whose features feed the pixel decoder.
            pixel_decoder: module with ``forward_features(features) -> (mask_features,
                multi_scale_features)``.
            transformer_decoder: module ``(multi_scale_features, mask_features) -> outputs``
                with ``pred_logits``, ``pred_masks`` and ``aux_outputs``.
            criterion: set criterion; its `weighted` gives the training losses.
            num_queries: number of object queries (kept for subclasses and logging).
            object_mask_threshold, overlap_threshold: panoptic post-processing thresholds.
            metadata: detectron2 Metadata of the test (or train) dataset.
            size_divisibility: pad images to a multiple of this (< 0 = the backbone's own).
            sem_seg_postprocess_before_inference: resize mask logits to the output size
                before (True) or after (False) semantic inference.
            pixel_mean, pixel_std: per-channel normalisation in the input's format.
            semantic_on, panoptic_on, instance_on: which outputs inference produces.
            test_topk_per_image: maximum instances per image.
            class_agnostic: a single "object" class; only instance outputs.
            oracles: ground-truth oracles applied before post-processing (cfg.TEST.ORACLE).
        """
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.criterion = criterion
        self.num_queries = num_queries
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.metadata = metadata
        # as the release: a negative value defers to the backbone, 0 means no padding
        self.size_divisibility = (
            size_divisibility if size_divisibility >= 0 else self.backbone.size_divisibility
        )
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.class_agnostic = class_agnostic
        if class_agnostic and (semantic_on or panoptic_on or not instance_on):
            logger.info(
                "MODEL.MASK_FORMER.CLASS_AGNOSTIC: only instance outputs are produced; "
                "TEST.SEMANTIC_ON / PANOPTIC_ON / INSTANCE_ON are ignored."
            )
            semantic_on, panoptic_on, instance_on = False, False, True
        if not (semantic_on or panoptic_on or instance_on):
            raise ValueError(
                "OpenSegMaskFormer: MODEL.MASK_FORMER.TEST.SEMANTIC_ON, PANOPTIC_ON and "
                "INSTANCE_ON are all False; enable at least one output."
            )
        self.semantic_on = semantic_on
        self.panoptic_on = panoptic_on
        self.instance_on = instance_on
        self.test_topk_per_image = test_topk_per_image
        self.thing_ids: Set[int] = set(
            getattr(metadata, "thing_dataset_id_to_contiguous_id", {}).values()
        )
        self.oracles = oracles

    @property
    def oracles(self) -> OracleSwitches:
        """Ground-truth oracles applied at inference (cfg.TEST.ORACLE); assigning checks that
        this model has what they need."""
        return self._oracles

    @oracles.setter
    def oracles(self, switches: OracleSwitches) -> None:
        if switches.enabled and (self.class_agnostic or not self.panoptic_on):
            raise ValueError(
                f"cfg.TEST.ORACLE ({switches.name}) needs class-aware panoptic output: set "
                "MODEL.MASK_FORMER.TEST.PANOPTIC_ON True and MODEL.MASK_FORMER.CLASS_AGNOSTIC "
                "False (the oracles are defined on panoptic inference)."
            )
        if switches.needs_mask_classifier and (
            type(self).classify_masks is OpenSegMaskFormer.classify_masks
        ):
            raise ValueError(
                f"cfg.TEST.ORACLE.SEGMENTATION alone needs a classifier of given masks, which "
                f"{type(self).__name__} lacks (it classifies its own queries only; FC-CLIP "
                "overrides `classify_masks` with CLIP mask pooling). Add "
                "TEST.ORACLE.MASK_SELECTION True (Table 4 row 2: matched queries keep their "
                "classes) or TEST.ORACLE.CLASSIFICATION True."
            )
        self._oracles = switches

    @classmethod
    def from_config(cls, cfg) -> Dict:
        mask_former = cfg.MODEL.MASK_FORMER
        class_agnostic = mask_former.CLASS_AGNOSTIC
        if class_agnostic:
            cfg = cfg.clone()
            cfg.defrost()
            cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 1
        backbone = build_backbone(cfg)
        pixel_decoder = build_pixel_decoder(cfg, backbone.output_shape())
        transformer_decoder = build_transformer_decoder(
            cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, mask_classification=True
        )
        return {
            "backbone": backbone,
            "pixel_decoder": pixel_decoder,
            "transformer_decoder": transformer_decoder,
            "criterion": cls.build_criterion(cfg),
            "num_queries": mask_former.NUM_OBJECT_QUERIES,
            "object_mask_threshold": mask_former.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": mask_former.TEST.OVERLAP_THRESHOLD,
            "metadata": cls.dataset_metadata(cfg),
            "size_divisibility": mask_former.SIZE_DIVISIBILITY,
            # as the release: panoptic and instance inference need the masks at the output
            # size anyway, so semantic inference then also runs on the resized masks
            "sem_seg_postprocess_before_inference": (
                mask_former.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE
                or mask_former.TEST.PANOPTIC_ON
                or mask_former.TEST.INSTANCE_ON
            ),
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "semantic_on": mask_former.TEST.SEMANTIC_ON,
            "panoptic_on": mask_former.TEST.PANOPTIC_ON,
            "instance_on": mask_former.TEST.INSTANCE_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "class_agnostic": class_agnostic,
            "oracles": OracleSwitches.from_config(cfg),
        }

    @staticmethod
    def build_criterion(cfg) -> SetCriterion:
        """Hungarian matcher + set criterion from cfg.MODEL.MASK_FORMER (Mask2Former Sec. 4)."""
        mask_former = cfg.MODEL.MASK_FORMER
        matcher = HungarianMatcher(
            cost_class=mask_former.CLASS_WEIGHT,
            cost_mask=mask_former.MASK_WEIGHT,
            cost_dice=mask_former.DICE_WEIGHT,
            num_points=mask_former.TRAIN_NUM_POINTS,
        )
        return SetCriterion(
            num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            matcher=matcher,
            weight_dict={
                "loss_ce": mask_former.CLASS_WEIGHT,
                "loss_mask": mask_former.MASK_WEIGHT,
                "loss_dice": mask_former.DICE_WEIGHT,
            },
            eos_coef=mask_former.NO_OBJECT_WEIGHT,
            losses=["labels", "masks"],
            num_points=mask_former.TRAIN_NUM_POINTS,
            oversample_ratio=mask_former.OVERSAMPLE_RATIO,
            importance_sample_ratio=mask_former.IMPORTANCE_SAMPLE_RATIO,
            deep_supervision=mask_former.DEEP_SUPERVISION,
        )

    @staticmethod
    def dataset_metadata(cfg):
        """Metadata of cfg.DATASETS.TEST[0], else TRAIN[0], else an empty one."""
        names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
        return MetadataCatalog.get(names[0] if names else "__openseg_no_dataset__")

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_images(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise and pad the images to a common size divisible by `size_divisibility`."""
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward_heads(self, features: Dict[str, Tensor]) -> Dict:
        """Pixel decoder + transformer decoder: ``pred_logits``, ``pred_masks``, ``aux_outputs``."""
        mask_features, multi_scale_features = self.pixel_decoder.forward_features(features)
        return self.transformer_decoder(multi_scale_features, mask_features)

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_images(batched_inputs)
        features = self.backbone(images.tensor)
        outputs = self.forward_heads(features)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            return self.losses(outputs, targets)
        return self.postprocess(outputs, batched_inputs, images)

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """Per image ``labels`` [N] and ``masks`` bool [N, H_pad, W_pad] padded like the images."""
        if any("instances" not in x for x in batched_inputs):
            raise KeyError(
                "OpenSegMaskFormer: training inputs need 'instances' (gt_classes, gt_masks); "
                "use a dataset mapper that produces them (cfg.INPUT.DATASET_MAPPER_NAME)."
            )
        padded_height, padded_width = images.tensor.shape[-2:]
        targets = []
        for x in batched_inputs:
            instances = x["instances"].to(self.device)
            gt_masks = instances.gt_masks
            if isinstance(gt_masks, BitMasks):
                gt_masks = gt_masks.tensor
            gt_masks = gt_masks.bool()
            height, width = gt_masks.shape[-2:]
            padded = gt_masks.new_zeros((gt_masks.shape[0], padded_height, padded_width))
            padded[:, :height, :width] = gt_masks
            labels = instances.gt_classes.long()
            if self.class_agnostic:
                labels = torch.zeros_like(labels)
            targets.append({"labels": labels, "masks": padded})
        return targets

    def losses(self, outputs: Dict, targets: List[Dict]) -> Dict[str, Tensor]:
        """Weighted set-criterion losses (main prediction and deep supervision)."""
        return self.criterion.weighted(self.criterion(outputs, targets))

    def postprocess(
        self, outputs: Dict, batched_inputs: List[Dict], images: ImageList
    ) -> List[Dict]:
        """Upsample mask logits to the padded input size, apply the enabled oracles
        (openseg.modeling.oracles), then post-process each image."""
        padded_size = tuple(images.tensor.shape[-2:])
        mask_pred_results = F.interpolate(
            outputs["pred_masks"], size=padded_size, mode="bilinear", align_corners=False,
        )
        processed_results = []
        for index, (mask_cls, mask_pred, x, image_size) in enumerate(zip(
            outputs["pred_logits"], mask_pred_results, batched_inputs, images.image_sizes
        )):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            if not self.oracles.enabled:
                processed_results.append(
                    self.inference_single_image(mask_cls, mask_pred, image_size, height, width)
                )
                continue
            gt_labels, gt_masks = ground_truth_of_input(x, padded_size, self.device)
            mask_cls, mask_pred = apply_oracles(
                self.oracles, mask_cls, mask_pred, gt_labels, gt_masks, image_size,
                lambda masks: self.classify_masks(
                    outputs, index, masks, mask_cls, mask_pred, image_size
                ),
            )
            result = self.inference_single_image(mask_cls, mask_pred, image_size, height, width)
            if self.oracles.relabels_panoptic:
                # Sec. 4.2: only the final panoptic map is relabelled; semantic and instance
                # outputs stay the model's own
                result["panoptic_seg"] = relabel_panoptic(
                    *result["panoptic_seg"], gt_labels,
                    ground_truth_at_output(gt_masks, image_size, (height, width)),
                    self.thing_ids, self.oracles.classification_iou,
                )
            processed_results.append(result)
        return processed_results

    def classify_masks(
        self, outputs: Dict, image_index: int, masks: Tensor, mask_cls: Tensor,
        mask_pred: Tensor, image_size: Tuple[int, int],
    ) -> Tensor:
        """[M, K+1] class logits of given bool masks [M, H_pad, W_pad] of image `image_index`:
        the classifier of the segmentation oracle (Sec. 4.1 of "What holds back
        open-vocabulary segmentation?"). A MaskFormer classifies its queries, not given masks,
        so it has none (the `oracles` setter refuses SEGMENTATION alone); open-vocabulary
        subclasses classify the masks' content (FC-CLIP: CLIP mask pooling)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot classify given masks (classify_masks)."
        )

    def inference_single_image(
        self, mask_cls: Tensor, mask_pred: Tensor, image_size: Tuple[int, int], height: int,
        width: int,
    ) -> Dict:
        """Standard outputs of one image from [Q, K+1] logits and [Q, H_pad, W_pad] masks.

        Panoptic and instance outputs are computed on masks cropped to `image_size` and resized
        to (height, width); semantic scores are resized before or after inference as
        `sem_seg_postprocess_before_inference` says.
        """
        result: Dict = {}
        output_masks = None
        if self.sem_seg_postprocess_before_inference or self.panoptic_on or self.instance_on:
            output_masks = sem_seg_postprocess(mask_pred, image_size, height, width)
        if self.semantic_on:
            if self.sem_seg_postprocess_before_inference:
                sem_seg = semantic_inference(mask_cls, output_masks)
            else:
                sem_seg = sem_seg_postprocess(
                    semantic_inference(mask_cls, mask_pred), image_size, height, width
                )
            result["sem_seg"] = sem_seg
        if self.panoptic_on:
            result["panoptic_seg"] = panoptic_inference(
                mask_cls, output_masks, thing_ids=self.thing_ids,
                object_mask_threshold=(
                    0.0 if self.oracles.keeps_all_masks else self.object_mask_threshold
                ),
                overlap_threshold=self.overlap_threshold,
            )
        if self.instance_on:
            result["instances"] = instance_inference(
                mask_cls, output_masks,
                thing_ids=None if self.class_agnostic else self.thing_ids,
                max_detections=self.test_topk_per_image,
                panoptic_on=self.panoptic_on,
            )
        return result

    def extra_repr(self) -> str:
        return (
            f"num_queries={self.num_queries}, class_agnostic={self.class_agnostic}, "
            f"semantic_on={self.semantic_on}, panoptic_on={self.panoptic_on}, "
            f"instance_on={self.instance_on}"
        )
