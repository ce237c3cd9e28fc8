"""Bipartite matching between predicted and ground-truth masks.

Set prediction as in DETR (Carion et al. ECCV 2020): every ground-truth segment is assigned to
exactly one query by the Hungarian algorithm on a pairwise cost. The cost follows Mask2Former
(Cheng et al. CVPR 2022, Sec. 3.3): class probability plus binary cross-entropy and dice
between masks, both evaluated on the same K random points for every prediction and target
instead of on full-resolution masks (Sec. 3.3, "Improving training efficiency": K = 12544
uniformly sampled points, the same set for every prediction and target of an image).

As the release, the points come from torch's global generator, one ``torch.rand(1, K, 2)``
per image and matching in image order, and the mask costs are computed in float32 under
mixed precision; a run seeded like a Mask2Former run therefore samples the same points.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .losses import sample_mask_points


def batch_sigmoid_ce_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of every prediction against every target.

    Args:
        inputs: mask logits, [N, P] (P sampled points).
        targets: binary targets in [0, 1], [M, P].
    Returns:
        [N, M] cost, entry (i, j) = mean over points of BCE(inputs[i], targets[j]).
    """
    num_points = inputs.shape[1]
    # BCE(x, t) = softplus(x) - t * x, so the pairwise sum over points is one matmul (the
    # release computes the BCE against 1 and against 0 and multiplies each by a matrix)
    loss_if_negative = F.softplus(inputs)
    cost = loss_if_negative.sum(-1, keepdim=True) - inputs @ targets.T
    return cost / num_points


def batch_dice_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Dice cost 1 - (2|p t| + 1) / (|p| + |t| + 1) of every prediction against every target.

    Args:
        inputs: mask logits, [N, P]; probabilities are their sigmoid.
        targets: binary targets in [0, 1], [M, P].
    Returns:
        [N, M] cost.
    """
    probs = inputs.sigmoid()
    intersection = 2 * probs @ targets.T
    sizes = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (intersection + 1) / (sizes + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth segments (Mask2Former Sec. 3.3).

    The cost of assigning query i to target j is
    ``cost_class * (-p_i(c_j)) + cost_mask * BCE(m_i, t_j) + cost_dice * Dice(m_i, t_j)``,
    with the mask terms computed on `num_points` uniformly random points shared by all
    predictions and targets of an image.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_mask: float = 1.0,
        cost_dice: float = 1.0,
        num_points: int = 12544,
    ):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError(
                "HungarianMatcher: cost_class, cost_mask and cost_dice are all 0; set at least "
                "one of MODEL.MASK_FORMER.CLASS_WEIGHT / MASK_WEIGHT / DICE_WEIGHT above 0."
            )
        if num_points <= 0:
            raise ValueError(
                f"HungarianMatcher: num_points must be positive (got {num_points}); "
                "check MODEL.MASK_FORMER.TRAIN_NUM_POINTS."
            )
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    def draw_points(self, device: torch.device) -> Tensor:
        """`num_points` uniform points [P, 2] in [0, 1]^2, drawn from torch's global generator.

        One ``torch.rand(1, P, 2)`` per image and matching, exactly as the release draws them,
        so a run seeded like a Mask2Former run samples the same points (the equivalence test
        checks the sequence of draws against the release's)."""
        return torch.rand(1, self.num_points, 2, device=device)[0]

    @torch.no_grad()
    def cost_matrix(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        tgt_labels: Tensor,
        tgt_masks: Tensor,
        point_coords: Optional[Tensor] = None,
    ) -> Tensor:
        """Pairwise assignment cost of one image.

        Args:
            pred_logits: [Q, K+1] class logits (last = no object).
            pred_masks: [Q, H, W] mask logits.
            tgt_labels: [M] contiguous class ids.
            tgt_masks: [M, H', W'] binary masks (any resolution: points are in [0, 1] coords).
            point_coords: optional [P, 2] sampling points in [0, 1]^2 (x, y); drawn uniformly
                with `num_points` points when omitted.
        Returns:
            [Q, M] float cost on the device of the predictions.
        """
        if point_coords is None:
            point_coords = self.draw_points(pred_masks.device)
        coords = point_coords[None].to(device=pred_masks.device, dtype=torch.float32)
        pred_points = point_sample(
            pred_masks[:, None].float(), coords.expand(pred_masks.shape[0], -1, -1),
            align_corners=False,
        )[:, 0]
        tgt_points = sample_mask_points(tgt_masks, point_coords).to(pred_points)
        class_probs = pred_logits.float().softmax(-1)
        cost = -self.cost_class * class_probs[:, tgt_labels.long()]
        # mask costs in float32 also under mixed precision, as the release computes them
        with torch.autocast(device_type=pred_points.device.type, enabled=False):
            pred_points, tgt_points = pred_points.float(), tgt_points.float()
            cost = cost + self.cost_mask * batch_sigmoid_ce_cost(pred_points, tgt_points)
            cost = cost + self.cost_dice * batch_dice_cost(pred_points, tgt_points)
        return cost

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: ``pred_logits`` [B, Q, K+1] and ``pred_masks`` [B, Q, H, W].
            targets: per image ``labels`` [M] and ``masks`` [M, H', W'].
        Returns:
            per image ``(query_indices, target_indices)`` int64 CPU tensors of equal length
            min(Q, M), ordered by query index.
        """
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(
                f"HungarianMatcher: {pred_logits.shape[0]} images of predictions but "
                f"{len(targets)} target dicts."
            )
        indices = []
        for image_idx, target in enumerate(targets):
            # drawn for every image, also one without targets, to keep the release's sequence
            points = self.draw_points(pred_masks.device)
            if target["labels"].numel() == 0 or pred_logits.shape[1] == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(
                pred_logits[image_idx], pred_masks[image_idx], target["labels"], target["masks"],
                points,
            )
            query_idx, target_idx = linear_sum_assignment(cost.cpu().numpy())
            indices.append(
                (
                    torch.as_tensor(query_idx, dtype=torch.int64),
                    torch.as_tensor(target_idx, dtype=torch.int64),
                )
            )
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )
