"""Ground-truth oracles for mask-transformer inference.

After "What holds back open-vocabulary segmentation?" (Saric et al. 2025): each oracle
replaces one step of mask-classification inference (Mask2Former, Cheng et al. CVPR 2022,
Sec. 4) by ground truth, so the PQ gained by switching it on measures how much that step
holds the model back. They act on one image's per-query class logits [Q, K+1] (last = no
object) and mask logits [Q, H, W] just before the standard post-processing, so every
`OpenSegMaskFormer` subclass runs under them unchanged:

- segmentation: the candidate masks are replaced by the ground-truth segments, classified by
  the model itself (`classify_masks`; FC-CLIP: the CLIP head on mask-pooled dense features)
  with the no-object class excluded;
- classification: every candidate mask with IoU > `classification_iou` against a ground-truth
  segment takes that segment's class (its no-object probability is kept);
- mask selection: ground truth and all candidates are matched one-to-one by the Hungarian
  algorithm on Mask2Former's BCE + Dice mask costs; matched candidates are kept whatever their
  no-object score, the others dropped;
- drop no-object: the no-object logit is ignored, every candidate competes on its classes.

Under the segmentation and mask-selection oracles the oracle decides which masks exist, so
panoptic post-processing keeps every remaining mask whatever its class confidence
(`OracleSwitches.selects_masks`; no OBJECT_MASK_THRESHOLD).

Combinations compose in the order selection -> segmentation -> classification -> drop
no-object. Selection + segmentation keeps the matched queries with their own class scores but
gives each its matched ground-truth mask (masks perfect, classification and selection the
model's); selection + classification keeps the matched queries' masks with their ground-truth
classes (classification and selection perfect, masks the model's).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..config import ORACLE_SWITCHES
from .matcher import batch_dice_cost, batch_sigmoid_ce_cost

# |mask logit| given to ground-truth masks: sigmoid(20) = 1 - 2e-9, so they are binary
GROUND_TRUTH_MASK_LOGIT = 20.0
# class logit of an impossible class after an oracle (softmax weight exp(-1e4) = 0)
IMPOSSIBLE_LOGIT = -1e4
MAX_MATCHING_GRID = 128  # mask costs on at most 128 x 128 evenly spaced pixels


@dataclass(frozen=True)
class OracleSwitches:
    """Which oracles are on (cfg.TEST.ORACLE.*)."""

    segmentation: bool = False
    classification: bool = False
    mask_selection: bool = False
    drop_no_object: bool = False
    classification_iou: float = 0.5

    @classmethod
    def from_config(cls, cfg) -> "OracleSwitches":
        oracle = cfg.TEST.ORACLE
        if not 0.0 <= oracle.CLASSIFICATION_IOU < 1.0:
            raise ValueError(
                f"cfg.TEST.ORACLE.CLASSIFICATION_IOU={oracle.CLASSIFICATION_IOU}: must be in [0, 1)."
            )
        return cls(
            segmentation=oracle.SEGMENTATION,
            classification=oracle.CLASSIFICATION,
            mask_selection=oracle.MASK_SELECTION,
            drop_no_object=oracle.DROP_NO_OBJECT,
            classification_iou=oracle.CLASSIFICATION_IOU,
        )

    @property
    def enabled(self) -> bool:
        return self.segmentation or self.classification or self.mask_selection or self.drop_no_object

    @property
    def selects_masks(self) -> bool:
        """The segmentation and mask-selection oracles decide which masks exist, so panoptic
        post-processing must keep all of them rather than drop low-confidence ones."""
        return self.segmentation or self.mask_selection

    @property
    def name(self) -> str:
        """"none" or the "+"-joined lower-case names of the oracles that are on."""
        on = [key.lower() for key in ORACLE_SWITCHES if getattr(self, key.lower())]
        return "+".join(on) if on else "none"


def ground_truth_of_input(
    batched_input: Dict, padded_size: Tuple[int, int], device: torch.device
) -> Tuple[Tensor, Tensor]:
    """(labels [M] int64, masks bool [M, H_pad, W_pad]) of one model input, padded like the
    images; the test mapper provides `instances` when an oracle is on."""
    if "instances" not in batched_input:
        raise KeyError(
            "cfg.TEST.ORACLE: an oracle is on but the model input has no 'instances' ground "
            f"truth (keys: {sorted(batched_input)}); build the test loader with "
            "openseg.data.mappers.build_mapper(cfg, is_train=False), which keeps it."
        )
    instances = batched_input["instances"]
    masks = instances.gt_masks
    masks = (masks.tensor if hasattr(masks, "tensor") else masks).to(device).bool()
    padded = masks.new_zeros((masks.shape[0], *padded_size))
    height, width = min(masks.shape[-2], padded_size[0]), min(masks.shape[-1], padded_size[1])
    padded[:, :height, :width] = masks[:, :height, :width]
    return instances.gt_classes.to(device).long(), padded


def mask_iou(masks_a: Tensor, masks_b: Tensor) -> Tensor:
    """[A, B] intersection over union of bool masks [A, H, W] and [B, H, W] (0 when both empty)."""
    a = masks_a.flatten(1).float()
    b = masks_b.flatten(1).float()
    intersection = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - intersection
    return intersection / union.clamp(min=1.0)


def matching_grid(image_size: Tuple[int, int], padded_size: Tuple[int, int], device) -> Tensor:
    """[P, 2] (x, y) point coordinates in [0, 1] of the padded frame: an evenly spaced grid of
    pixel centres inside the valid `image_size` region (deterministic, unlike random points)."""
    height, width = image_size
    rows = torch.linspace(0, height - 1, min(height, MAX_MATCHING_GRID), device=device) + 0.5
    cols = torch.linspace(0, width - 1, min(width, MAX_MATCHING_GRID), device=device) + 0.5
    grid_y, grid_x = torch.meshgrid(rows / padded_size[0], cols / padded_size[1], indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)


def match_masks(
    mask_pred: Tensor, gt_masks: Tensor, image_size: Tuple[int, int], mask_weight: float = 5.0,
    dice_weight: float = 5.0,
) -> Tuple[Tensor, Tensor]:
    """Hungarian matching of candidates to ground truth on Mask2Former's mask costs only
    (`mask_weight` x BCE + `dice_weight` x Dice, Sec. 3.3), with no class term.

    Returns (query indices, ground-truth indices), int64 on the masks' device."""
    device = mask_pred.device
    if mask_pred.shape[0] == 0 or gt_masks.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    coords = matching_grid(image_size, tuple(mask_pred.shape[-2:]), device)[None]
    pred_points = point_sample(
        mask_pred[:, None].float(), coords.expand(mask_pred.shape[0], -1, -1), align_corners=False
    )[:, 0]
    gt_points = point_sample(
        gt_masks[:, None].float(), coords.expand(gt_masks.shape[0], -1, -1), align_corners=False
    )[:, 0]
    cost = mask_weight * batch_sigmoid_ce_cost(pred_points, gt_points) + dice_weight * batch_dice_cost(
        pred_points, gt_points
    )
    query_index, gt_index = linear_sum_assignment(cost.cpu().numpy())
    return (
        torch.as_tensor(query_index, dtype=torch.long, device=device),
        torch.as_tensor(gt_index, dtype=torch.long, device=device),
    )


def masks_as_logits(masks: Tensor) -> Tensor:
    """Binary masks -> mask logits whose sigmoid is (numerically) the mask."""
    return torch.where(masks.bool(), GROUND_TRUTH_MASK_LOGIT, -GROUND_TRUTH_MASK_LOGIT).float()


def one_hot_logits(labels: Tensor, num_classes_with_void: int, keep_void: Optional[Tensor] = None) -> Tensor:
    """[N, K+1] log-probabilities putting all mass on `labels`, or, with `keep_void` [N]
    no-object probabilities, 1 - keep_void on the label and keep_void on no-object."""
    probs = torch.zeros(labels.shape[0], num_classes_with_void, device=labels.device)
    probs[torch.arange(labels.shape[0], device=labels.device), labels] = 1.0
    if keep_void is not None:
        probs = probs * (1.0 - keep_void[:, None])
        probs[:, -1] = keep_void
    return probs.clamp(min=1e-12).log().clamp(min=IMPOSSIBLE_LOGIT)


def apply_oracles(
    switches: OracleSwitches,
    mask_cls: Tensor,
    mask_pred: Tensor,
    gt_labels: Tensor,
    gt_masks: Tensor,
    image_size: Tuple[int, int],
    classify_masks: Callable[[Tensor], Tensor],
) -> Tuple[Tensor, Tensor]:
    """Oracle-modified (class logits [Q', K+1], mask logits [Q', H, W]) of one image.

    Args:
        mask_cls: [Q, K+1] class logits (last = no object); mask_pred: [Q, H, W] mask logits
            in the padded input frame.
        gt_labels: [M] contiguous ids; gt_masks: bool [M, H, W] in the same frame.
        image_size: (h, w) valid region; IoUs and matching ignore the padding.
        classify_masks: the model's classifier for given bool masks [M, H, W] -> [M, K+1]
            logits (used by the segmentation oracle alone).
    """
    if not switches.enabled:
        return mask_cls, mask_pred
    if gt_labels.numel() and int(gt_labels.max()) >= mask_cls.shape[-1] - 1:
        raise ValueError(
            f"Ground-truth class {int(gt_labels.max())} is outside the model's "
            f"{mask_cls.shape[-1] - 1} classes; the oracle needs the test dataset's vocabulary "
            "(cfg.DATASETS.TEST with cfg.MODEL.OPEN_VOCABULARY, or a matching NUM_CLASSES)."
        )
    num_outputs = mask_cls.shape[-1]
    height, width = image_size
    if switches.mask_selection:
        query_index, gt_index = match_masks(mask_pred, gt_masks, image_size)
        mask_cls, mask_pred = mask_cls[query_index], mask_pred[query_index]
        # a matched candidate is kept whatever its no-object score
        mask_cls = mask_cls.clone()
        mask_cls[:, -1] = IMPOSSIBLE_LOGIT
        gt_labels, gt_masks = gt_labels[gt_index], gt_masks[gt_index]
        if switches.segmentation:
            mask_pred = masks_as_logits(gt_masks)
    elif switches.segmentation:
        mask_cls = classify_masks(gt_masks).clone()
        mask_cls[:, -1] = IMPOSSIBLE_LOGIT  # ground-truth segments are never "no object"
        mask_pred = masks_as_logits(gt_masks)
    if switches.classification and gt_labels.numel() and mask_pred.shape[0]:
        binary = mask_pred[:, :height, :width] > 0
        iou = mask_iou(binary, gt_masks[:, :height, :width])
        best_iou, best_gt = iou.max(dim=1)
        hit = best_iou > switches.classification_iou
        if hit.any():
            # ground-truth masks are never "no object"; the model's candidates keep their score
            void_prob = None if switches.segmentation else mask_cls[hit].float().softmax(-1)[:, -1]
            mask_cls = mask_cls.clone()
            mask_cls[hit] = one_hot_logits(gt_labels[best_gt[hit]], num_outputs, void_prob).to(mask_cls)
    if switches.drop_no_object:
        mask_cls = mask_cls.clone()
        mask_cls[:, -1] = IMPOSSIBLE_LOGIT
    return mask_cls, mask_pred


def matched_query_logits(
    mask_cls: Tensor, mask_pred: Tensor, gt_masks: Tensor, image_size: Tuple[int, int]
) -> Tensor:
    """[M, K+1] class logits of the query matched to each ground-truth mask (BCE + Dice
    Hungarian matching); masks left without a query (more masks than queries) get uniform
    class scores. The default `classify_masks` of a model whose classifier only reads its own
    queries."""
    logits = torch.zeros(
        (gt_masks.shape[0], mask_cls.shape[-1]), device=mask_cls.device, dtype=mask_cls.dtype
    )
    query_index, gt_index = match_masks(mask_pred, gt_masks, image_size)
    logits[gt_index] = mask_cls[query_index]
    return logits


def oracle_combinations() -> List[OracleSwitches]:
    """The variants of the oracle study: none, each oracle alone, and the paper's pairs."""
    return [
        OracleSwitches(),
        OracleSwitches(drop_no_object=True),
        OracleSwitches(mask_selection=True),
        OracleSwitches(classification=True),
        OracleSwitches(segmentation=True),
        OracleSwitches(mask_selection=True, segmentation=True),
        OracleSwitches(mask_selection=True, classification=True),
        OracleSwitches(segmentation=True, classification=True),
    ]
