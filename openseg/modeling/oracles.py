"""Ground-truth oracles of "What holds back open-vocabulary segmentation?" (Sec. 4.1-4.3).

Each oracle replaces one step of mask-transformer inference (Mask2Former, Cheng et al. CVPR
2022, Sec. 4) by ground truth; the PQ gained by switching it on measures how much that step
holds the model back. They act on one image's per-query class logits [Q, K+1] (last = no
object) and mask logits [Q, H, W] around the standard panoptic post-processing of
`OpenSegMaskFormer`, so every subclass (FC-CLIP, MAFT+, ...) runs under them unchanged.
Switches are cfg.TEST.ORACLE.*; the paper's table rows are `PAPER_ROWS`:

- SEGMENTATION (Sec. 4.1, Table 1): "Our segmentation oracle produces a set of perfect binary
  masks, one for each panoptic segment. [...] we recover panoptic segmentation by assigning
  each mask with the class whose text embedding yields the highest cosine similarity with the
  corresponding visual representation." The masks are the ground-truth segments, classified
  by the model's own mask classifier (`classify_masks`; FC-CLIP: its CLIP head), no-object
  excluded, and every one of them is kept.
- CLASSIFICATION (Sec. 4.2, Table 2): "Our oracle adjusts the class posteriors of the final
  panoptic map for all masks that overlap a ground truth segment with IoU > 0.5." It relabels
  the segments of the finished panoptic prediction (`relabel_panoptic`): masks that inference
  discarded stay discarded, and a segment at IoU exactly 0.5 keeps its class.
- MASK_SELECTION (Sec. 4.3, Table 3 row 2): "we apply Hungarian matching between the ground
  truth masks and the full set of candidate masks [...] The matching cost is computed using a
  combination of binary cross-entropy and Dice loss. After matching, we discard the unmatched
  candidate masks and proceed with the standard panoptic inference." No-object filtering and
  the object-mask threshold stay as configured, so a matched mask can still be lost.
- DROP_NO_OBJECT (Table 3 row 3): "We therefore modify the inference by removing the
  'no-object' logit, ensuring that all oracle-selected masks are included in panoptic
  prediction." The no-object logit is removed and the object-mask threshold is 0 (the value
  of the released FC-CLIP evaluation configs anyway), so no mask is filtered for confidence;
  masks eclipsed by others can still lose their pixels (overlap threshold).
- MASK_SELECTION + SEGMENTATION (Table 4 row 2): "The segmentation oracle uses ground truth to
  fix the boundaries of the matched masks, while retaining the mask classifications of the
  corresponding open-voc segmentation model."
- MASK_SELECTION + CLASSIFICATION (Table 4 row 3): "The classification oracle extends the
  optimal mask selection by assigning correct one-hot class probabilities based on the
  matching with ground truth segments." Every matched mask takes the one-hot class of its
  ground-truth segment, whatever their IoU.
Table 4 builds on Table 3 row 3 (its first row repeats it), so its rows also drop the
no-object logit. SEGMENTATION + CLASSIFICATION (not a paper row) gives the ground-truth
segments their own classes.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Set, Tuple

import torch
import torch.nn.functional as F
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
    def relabels_panoptic(self) -> bool:
        """The classification oracle alone acts on the final panoptic map (Sec. 4.2); with mask
        selection or segmentation the ground-truth class comes from the matching instead."""
        return self.classification and not (self.mask_selection or self.segmentation)

    @property
    def keeps_all_masks(self) -> bool:
        """No mask is filtered for its class confidence (object-mask threshold 0): the
        segmentation oracle alone keeps one mask per ground-truth segment, and dropping the
        no-object logit includes "all oracle-selected masks" (Sec. 4.3)."""
        return self.drop_no_object or (self.segmentation and not self.mask_selection)

    @property
    def needs_mask_classifier(self) -> bool:
        """Ground-truth masks classified by the model (Sec. 4.1): the model must classify given
        masks, not only its own queries."""
        return self.segmentation and not (self.mask_selection or self.classification)

    @property
    def name(self) -> str:
        """"none" or the "+"-joined lower-case names of the oracles that are on."""
        on = [key.lower() for key in ORACLE_SWITCHES if getattr(self, key.lower())]
        return "+".join(on) if on else "none"

    def config_opts(self) -> List[str]:
        """The cfg.TEST.ORACLE KEY VALUE pairs that switch these oracles on."""
        opts: List[str] = []
        for key in ORACLE_SWITCHES:
            if getattr(self, key.lower()):
                opts += [f"TEST.ORACLE.{key}", "True"]
        if self.classification_iou != OracleSwitches.classification_iou:
            opts += ["TEST.ORACLE.CLASSIFICATION_IOU", str(self.classification_iou)]
        return opts


# (table, row) -> (label, switches) of the model rows of Tables 2-4 (Table 1 rows are VLMs,
# run by tools/oracle_study.py with the segmentation oracle on bare CLIP models)
PAPER_ROWS: Dict[Tuple[int, int], Tuple[str, OracleSwitches]] = {
    (2, 1): ("model", OracleSwitches()),
    (2, 2): ("+ oracle classification", OracleSwitches(classification=True)),
    (3, 1): ("model", OracleSwitches()),
    (3, 2): ("+ oracle mask selection", OracleSwitches(mask_selection=True)),
    (3, 3): (
        "+ dropping no-object logit", OracleSwitches(mask_selection=True, drop_no_object=True)
    ),
    (4, 1): ("w/ oracle mask selection", OracleSwitches(mask_selection=True, drop_no_object=True)),
    (4, 2): (
        "+ oracle segmentation",
        OracleSwitches(mask_selection=True, drop_no_object=True, segmentation=True),
    ),
    (4, 3): (
        "+ oracle classification",
        OracleSwitches(mask_selection=True, drop_no_object=True, classification=True),
    ),
}


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


def one_hot_logits(labels: Tensor, num_classes_with_void: int) -> Tensor:
    """[N, K+1] logits whose softmax is the one-hot distribution of `labels` (no-object 0)."""
    logits = torch.full(
        (labels.shape[0], num_classes_with_void), IMPOSSIBLE_LOGIT, device=labels.device
    )
    logits[torch.arange(labels.shape[0], device=labels.device), labels] = 0.0
    return logits


def apply_oracles(
    switches: OracleSwitches,
    mask_cls: Tensor,
    mask_pred: Tensor,
    gt_labels: Tensor,
    gt_masks: Tensor,
    image_size: Tuple[int, int],
    classify_masks: Callable[[Tensor], Tensor],
) -> Tuple[Tensor, Tensor]:
    """Oracle-modified (class logits [Q', K+1], mask logits [Q', H, W]) of one image, before
    panoptic post-processing (the classification oracle alone acts after it:
    `relabel_panoptic`). Definitions in the module docstring.

    Args:
        mask_cls: [Q, K+1] class logits (last = no object); mask_pred: [Q, H, W] mask logits
            in the padded input frame.
        gt_labels: [M] contiguous ids; gt_masks: bool [M, H, W] in the same frame.
        image_size: (h, w) valid region; the matching ignores the padding.
        classify_masks: the model's classifier of given bool masks [M, H, W] -> [M, K+1]
            logits (called by the segmentation oracle alone).
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
    if switches.mask_selection:
        query_index, gt_index = match_masks(mask_pred, gt_masks, image_size)
        mask_cls, mask_pred = mask_cls[query_index], mask_pred[query_index]
        gt_labels, gt_masks = gt_labels[gt_index], gt_masks[gt_index]
        if switches.segmentation:
            mask_pred = masks_as_logits(gt_masks)
        if switches.classification:
            mask_cls = one_hot_logits(gt_labels, num_outputs).to(mask_cls)
    elif switches.segmentation:
        mask_pred = masks_as_logits(gt_masks)
        if switches.classification:
            mask_cls = one_hot_logits(gt_labels, num_outputs).to(mask_cls)
        else:
            mask_cls = classify_masks(gt_masks).clone()
            mask_cls[:, -1] = IMPOSSIBLE_LOGIT  # a ground-truth segment is never "no object"
    if switches.drop_no_object:
        mask_cls = mask_cls.clone()
        mask_cls[:, -1] = IMPOSSIBLE_LOGIT
    return mask_cls, mask_pred


def relabel_panoptic(
    panoptic_seg: Tensor,
    segments_info: List[Dict],
    gt_labels: Tensor,
    gt_masks: Tensor,
    thing_ids: Set[int],
    iou_threshold: float = 0.5,
) -> Tuple[Tensor, List[Dict]]:
    """The classification oracle (Sec. 4.2): every segment of the final panoptic map whose IoU
    with a ground-truth segment is > `iou_threshold` takes that segment's class; the others
    and the map itself are unchanged.

    Args:
        panoptic_seg: int [H, W] segment ids (0 = void); segments_info: detectron2's dicts.
        gt_labels: [M]; gt_masks: bool [M, H, W] at the panoptic map's size.
    Returns:
        (the same `panoptic_seg`, new segments_info with `category_id` / `isthing` updated).
    """
    if not segments_info or not gt_labels.numel():
        return panoptic_seg, segments_info
    ids = torch.tensor([s["id"] for s in segments_info], device=panoptic_seg.device)
    predicted = panoptic_seg[None] == ids[:, None, None]
    best_iou, best_gt = mask_iou(predicted, gt_masks.to(predicted.device)).max(dim=1)
    relabelled = []
    for segment, iou, gt in zip(segments_info, best_iou.tolist(), best_gt.tolist()):
        segment = dict(segment)
        if iou > iou_threshold:
            category = int(gt_labels[gt])
            segment.update(category_id=category, isthing=category in thing_ids)
        relabelled.append(segment)
    return panoptic_seg, relabelled


def ground_truth_at_output(
    gt_masks: Tensor, image_size: Tuple[int, int], output_size: Tuple[int, int]
) -> Tensor:
    """Padded-frame ground-truth masks cropped to `image_size` and resized (nearest) to the
    output size, where the final panoptic map lives."""
    masks = gt_masks[:, : image_size[0], : image_size[1]]
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *output_size))
    if tuple(masks.shape[-2:]) == tuple(output_size):
        return masks
    return F.interpolate(masks[None].float(), size=tuple(output_size), mode="nearest")[0] > 0.5


def oracle_variants() -> List[OracleSwitches]:
    """The distinct oracle settings of Tables 2-4, in table order."""
    variants: List[OracleSwitches] = []
    for _, switches in PAPER_ROWS.values():
        if switches not in variants:
            variants.append(switches)
    return variants
