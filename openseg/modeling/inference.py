"""Turn per-query class scores and mask logits into detectron2's standard outputs.

Implements the three post-processing rules of Mask2Former (Cheng et al. CVPR 2022, Sec. 4
"inference", following MaskFormer, Cheng et al. NeurIPS 2021, Sec. 3.4):
semantic = sum over queries of class probability x mask probability; panoptic = each pixel
to the query with the highest score x mask probability, keeping confident queries whose
visible part is large enough; instance = top-k (query, class) pairs scored by class
probability x mean mask probability inside the mask.

Details follow the release's `MaskFormer.{semantic,panoptic,instance}_inference`: a query
keeps its panoptic segment when visible / own area is *not below* the overlap threshold
(``<`` drops, so a segment exactly at the threshold stays), and when panoptic or instance
output is on the meta-architecture resizes the mask logits to the output size before semantic
inference too. `tests/test_reference_mask2former.py` checks all three against the release.
"""
from typing import Dict, List, Optional, Set, Tuple

import torch
from detectron2.structures import Boxes, Instances
from torch import Tensor


def semantic_inference(mask_cls: Tensor, mask_pred: Tensor) -> Tensor:
    """Per-class soft semantic map.

    Args:
        mask_cls: [Q, K+1] class logits (last = no object).
        mask_pred: [Q, H, W] mask logits.
    Returns:
        [K, H, W] scores: sum_q softmax(mask_cls)[q, k] * sigmoid(mask_pred)[q].
    """
    class_probs = mask_cls.softmax(-1)[:, :-1]
    return torch.einsum("qk,qhw->khw", class_probs, mask_pred.sigmoid())


def panoptic_inference(
    mask_cls: Tensor,
    mask_pred: Tensor,
    *,
    thing_ids: Set[int],
    object_mask_threshold: float,
    overlap_threshold: float,
) -> Tuple[Tensor, List[Dict]]:
    """Non-overlapping panoptic segmentation of one image.

    Queries predicting no-object or with a best class probability <= `object_mask_threshold`
    are dropped. Each pixel goes to the remaining query maximising probability x mask
    probability; a query keeps the pixels it wins inside its own mask (sigmoid >= 0.5) only if
    they are at least `overlap_threshold` of that mask. Stuff queries of the same class are
    merged into one segment.

    Args:
        mask_cls: [Q, K+1] class logits; mask_pred: [Q, H, W] mask logits.
        thing_ids: contiguous ids of thing classes.
    Returns:
        ``(panoptic_seg, segments_info)``: int32 [H, W] segment ids (0 = void) and one dict
        ``{"id", "isthing", "category_id"}`` per segment, as detectron2's panoptic output.
    """
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = mask_cls.softmax(-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    kept_scores, kept_labels = scores[keep], labels[keep]
    kept_probs = mask_pred[keep].sigmoid()

    height, width = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((height, width), dtype=torch.int32, device=mask_pred.device)
    segments_info: List[Dict] = []
    if kept_probs.shape[0] == 0:
        return panoptic_seg, segments_info

    winner = (kept_scores[:, None, None] * kept_probs).argmax(0)
    stuff_segment_of_class: Dict[int, int] = {}
    for k in range(kept_labels.shape[0]):
        category_id = int(kept_labels[k])
        isthing = category_id in thing_ids
        own_mask = kept_probs[k] >= 0.5
        won_area = (winner == k).sum().item()
        own_area = own_mask.sum().item()
        visible = (winner == k) & own_mask
        if won_area == 0 or own_area == 0 or visible.sum().item() == 0:
            continue
        if won_area / own_area < overlap_threshold:
            continue
        if not isthing and category_id in stuff_segment_of_class:
            panoptic_seg[visible] = stuff_segment_of_class[category_id]
            continue
        segment_id = len(segments_info) + 1
        if not isthing:
            stuff_segment_of_class[category_id] = segment_id
        panoptic_seg[visible] = segment_id
        segments_info.append({"id": segment_id, "isthing": isthing, "category_id": category_id})
    return panoptic_seg, segments_info


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight XYXY boxes of binary masks [N, H, W] -> [N, 4] float, detectron2's convention
    (x1, y1, last column + 1, last row + 1); empty masks get an all-zero box."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    height, width = masks.shape[-2:]
    columns = masks.any(dim=1)
    rows = masks.any(dim=2)
    col_range = torch.arange(width, device=masks.device)
    row_range = torch.arange(height, device=masks.device)
    x1 = torch.where(columns, col_range, width).amin(1)
    x2 = torch.where(columns, col_range, -1).amax(1) + 1
    y1 = torch.where(rows, row_range, height).amin(1)
    y2 = torch.where(rows, row_range, -1).amax(1) + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    boxes[~columns.any(1)] = 0
    return boxes


def instance_inference(
    mask_cls: Tensor,
    mask_pred: Tensor,
    *,
    thing_ids: Optional[Set[int]],
    max_detections: int,
    panoptic_on: bool,
) -> Instances:
    """Top-`max_detections` (query, class) pairs of one image as detectron2 Instances.

    Every query may be reported with several classes. With `panoptic_on`, pairs whose class is
    not in `thing_ids` are dropped (stuff has no instances); `thing_ids=None` keeps every
    class (class-agnostic models, where the only class is 0).

    Args:
        mask_cls: [Q, K+1] class logits; mask_pred: [Q, H, W] mask logits.
    Returns:
        Instances of size (H, W) with ``pred_masks`` (bool [N, H, W]), ``pred_boxes``,
        ``scores`` (class probability x mean mask probability inside the mask) and
        ``pred_classes`` (int64).
    """
    num_queries = mask_cls.shape[0]
    num_classes = mask_cls.shape[-1] - 1
    height, width = mask_pred.shape[-2:]
    class_probs = mask_cls.softmax(-1)[:, :-1]
    labels = torch.arange(num_classes, device=mask_cls.device).repeat(num_queries)
    top_scores, top_indices = class_probs.flatten().topk(
        min(max_detections, num_queries * num_classes), sorted=True
    )
    pred_classes = labels[top_indices]
    query_indices = torch.div(top_indices, num_classes, rounding_mode="floor")
    if panoptic_on and thing_ids is not None:
        is_thing = torch.tensor(
            [int(c) in thing_ids for c in pred_classes.tolist()],
            dtype=torch.bool, device=mask_cls.device,
        )
        top_scores, pred_classes, query_indices = (
            top_scores[is_thing], pred_classes[is_thing], query_indices[is_thing]
        )

    selected = mask_pred[query_indices]
    pred_masks = selected > 0
    mask_probs = selected.sigmoid().flatten(1)
    inside = pred_masks.flatten(1).float()
    mask_scores = (mask_probs * inside).sum(1) / (inside.sum(1) + 1e-6)

    result = Instances((height, width))
    result.pred_masks = pred_masks
    result.pred_boxes = Boxes(masks_to_boxes(pred_masks))
    result.scores = top_scores * mask_scores
    result.pred_classes = pred_classes
    return result
