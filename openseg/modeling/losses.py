"""Set criterion of mask-classification models (Mask2Former, Cheng et al. CVPR 2022).

After Hungarian matching, matched queries are supervised with their target's class and mask,
unmatched queries with the "no object" class (down-weighted by `eos_coef`). Mask losses
(binary cross-entropy + dice) are computed on K points per mask chosen by PointRend-style
importance sampling (Mask2Former Sec. 3.3 and Sec. 4 "point loss"): mostly the most uncertain
points of the prediction plus some uniformly random ones.

Loss weights (Sec. 4.1): lambda_ce = 2.0, lambda_bce = 5.0, lambda_dice = 5.0, no-object
class weight 0.1. Following the release, the final prediction is matched and supervised
first, then each ``aux_outputs`` entry in order (keys ``_0``, ``_1``, ...), each with its own
matching; points are drawn from torch's global generator with detectron2's
`get_uncertain_point_coords_with_randomness`, in the release's order, so that given the same
seed the losses and gradients equal the release's (`tests/test_reference_mask2former.py`).
"""
import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils import comm
from torch import Tensor, nn

__all__ = [
    "point_sample",
    "sample_mask_points",
    "get_uncertain_point_coords_with_randomness",
    "calculate_uncertainty",
    "dice_loss",
    "sigmoid_ce_loss",
    "sigmoid_focal_loss",
    "SetCriterion",
]

Indices = List[Tuple[Tensor, Tensor]]
LossFunction = Callable[[Dict[str, Tensor], List[Dict[str, Tensor]], Indices, float],
                        Dict[str, Tensor]]

_AUX_SUFFIX = re.compile(r"^(.*)_\d+$")


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Dice loss 1 - (2|p t| + 1) / (|p| + |t| + 1) per mask, summed and divided by num_masks.

    Args:
        inputs: mask logits [N, P]; targets: binary targets [N, P] (row i matches row i).
    """
    probs = inputs.sigmoid().flatten(1)
    targets = targets.flatten(1)
    intersection = 2 * (probs * targets).sum(-1)
    sizes = probs.sum(-1) + targets.sum(-1)
    return (1 - (intersection + 1) / (sizes + 1)).sum() / num_masks


def sigmoid_ce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Binary cross-entropy averaged over points of each mask, summed over masks / num_masks."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.flatten(1).mean(1).sum() / num_masks


def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, num_masks: float, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Focal loss (Lin et al. ICCV 2017, Eq. 5) averaged over points, summed / num_masks.

    `alpha` < 0 disables the class-balancing factor.
    """
    probs = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    prob_of_truth = probs * targets + (1 - probs) * (1 - targets)
    loss = ce * (1 - prob_of_truth) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(1).mean(1).sum() / num_masks


def sample_mask_points(
    masks: Tensor,
    point_coords: Tensor,
    mask_index: Optional[Tensor] = None,
    canvas_size: Optional[Tuple[int, int]] = None,
) -> Tensor:
    """Bilinear samples of (binary) target masks at points, read without a float copy of the masks.

    Computes what ``point_sample(masks[mask_index][:, None].float(), coords,
    align_corners=False)[:, 0]`` computes (pixel centres at (i + 0.5) / size, zero outside),
    but gathers the four neighbours of each point from the masks in their own dtype: targets
    are full-resolution bool masks, and converting them to float for every matching and loss
    call (as the release does) costs time and a full-resolution float tensor at the training
    step's memory peak.

    Args:
        masks: [M, H, W] masks of any dtype.
        point_coords: (x, y) in [0, 1]: [K, 2] shared by every sampled mask, or [N, K, 2].
        mask_index: [N] which mask each row samples (default: every mask in order).
        canvas_size: (H', W') >= (H, W) the coordinates refer to, the masks sitting zero-padded
            in its top-left corner (default: the masks' own size).
    Returns:
        [N, K] float32 samples.
    """
    num_masks, height, width = masks.shape
    if mask_index is None:
        mask_index = torch.arange(num_masks, device=masks.device)
    canvas_height, canvas_width = canvas_size or (height, width)
    coords = point_coords.to(device=masks.device, dtype=torch.float32)
    if coords.dim() == 2:
        coords = coords[None]
    # grid_sample's unnormalisation (align_corners=False) of the grid 2 * coords - 1
    grid = 2.0 * coords - 1.0
    x = ((grid[..., 0] + 1) * canvas_width - 1) / 2
    y = ((grid[..., 1] + 1) * canvas_height - 1) / 2
    x0, y0 = x.floor(), y.floor()
    right, below = x - x0, y - y0
    flat = masks.reshape(num_masks, height * width)
    rows = mask_index.to(masks.device).long()[:, None]
    result = None
    for dx, weight_x in ((0, 1 - right), (1, right)):
        for dy, weight_y in ((0, 1 - below), (1, below)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            index = (yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)).long()
            term = flat[rows, index].float() * (weight_x * weight_y * inside)
            result = term if result is None else result + term
    return result


def calculate_uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of a binary mask logit: -|logit|, highest at the decision boundary."""
    return -torch.abs(logits)


class SetCriterion(nn.Module):
    """Hungarian-matched classification and point-sampled mask losses with deep supervision.

    Loss terms are looked up by name in `self.loss_functions`; methods add their own with
    `register_loss(name, fn)` where ``fn(outputs, targets, indices, num_masks) -> dict``.
    `forward` supervises the final prediction and every entry of ``outputs["aux_outputs"]``
    (keys suffixed ``_0``, ``_1``, ...); `compute` runs the losses on any output dict (e.g.
    an extra query group) with its own matching or with given indices.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Mapping[str, float],
        eos_coef: float,
        losses: Iterable[str],
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        deep_supervision: bool = True,
    ):
        """
        Args:
            num_classes: K, number of real classes (the no-object class is index K).
            matcher: callable ``(outputs, targets) -> indices`` such as HungarianMatcher.
            weight_dict: weight of each loss name; an auxiliary key ``loss_x_3`` without its
                own entry uses the weight of ``loss_x``.
            eos_coef: relative classification weight of the no-object class.
            losses: names of the loss terms to compute ("labels", "masks" or registered).
            num_points: K points per mask for the point-sampled mask losses.
            oversample_ratio: candidate points drawn per kept point (>= 1).
            importance_sample_ratio: fraction of the K points picked by uncertainty.
            deep_supervision: also supervise ``outputs["aux_outputs"]``.
        """
        super().__init__()
        if oversample_ratio < 1:
            raise ValueError(
                f"SetCriterion: oversample_ratio must be >= 1 (got {oversample_ratio}); "
                "check MODEL.MASK_FORMER.OVERSAMPLE_RATIO."
            )
        if not 0 <= importance_sample_ratio <= 1:
            raise ValueError(
                "SetCriterion: importance_sample_ratio must be in [0, 1] (got "
                f"{importance_sample_ratio}); check MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO."
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("empty_weight", class_weight)
        self.loss_functions: Dict[str, LossFunction] = {
            "labels": self.loss_labels,
            "masks": self.loss_masks,
        }
        self.losses = list(losses)
        for name in self.losses:
            self._check_loss_name(name)

    def register_loss(self, name: str, fn: LossFunction, enabled: bool = True) -> None:
        """Add a loss term ``fn(outputs, targets, indices, num_masks) -> {loss_key: value}``."""
        self.loss_functions[name] = fn
        if enabled and name not in self.losses:
            self.losses.append(name)

    def _check_loss_name(self, name: str) -> None:
        if name not in self.loss_functions:
            raise KeyError(
                f"SetCriterion: unknown loss '{name}'; available: {sorted(self.loss_functions)}. "
                "Register new terms with SetCriterion.register_loss."
            )

    def loss_labels(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]], indices: Indices,
        num_masks: float,
    ) -> Dict[str, Tensor]:
        """Cross-entropy over K+1 classes; unmatched queries target no-object (weight eos_coef)."""
        logits = outputs["pred_logits"].float()
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        batch_idx, query_idx = self._prediction_indices(indices)
        matched_labels = torch.cat(
            [target["labels"][tgt_idx.to(target["labels"].device)]
             for target, (_, tgt_idx) in zip(targets, indices)]
        )
        target_classes[batch_idx.to(logits.device), query_idx.to(logits.device)] = (
            matched_labels.to(device=logits.device, dtype=torch.int64)
        )
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss}

    def loss_masks(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]], indices: Indices,
        num_masks: float,
    ) -> Dict[str, Tensor]:
        """Point-sampled sigmoid BCE and dice between matched predicted and target masks."""
        pred_masks = outputs["pred_masks"]
        batch_idx, query_idx = self._prediction_indices(indices)
        batch_idx, query_idx = batch_idx.to(pred_masks.device), query_idx.to(pred_masks.device)
        matched_pred = pred_masks[batch_idx, query_idx]
        if matched_pred.shape[0] == 0:
            # keep the graph so that every rank runs the same backward
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        matched_pred = matched_pred[:, None].float()
        with torch.no_grad():
            point_coords = get_uncertain_point_coords_with_randomness(
                matched_pred,
                calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            point_labels = self._matched_target_points(targets, indices, point_coords)
        point_logits = point_sample(matched_pred, point_coords, align_corners=False)[:, 0]
        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    @staticmethod
    def _prediction_indices(indices: Indices) -> Tuple[Tensor, Tensor]:
        """(image index, query index) of every matched prediction, concatenated over images."""
        batch_idx = [torch.full_like(src, i) for i, (src, _) in enumerate(indices)]
        query_idx = [src for src, _ in indices]
        return torch.cat(batch_idx).long(), torch.cat(query_idx).long()

    @staticmethod
    def _matched_target_points(
        targets: List[Dict[str, Tensor]], indices: Indices, point_coords: Tensor
    ) -> Tensor:
        """Samples [N, K] of the matched target masks (matching order) at `point_coords`
        [N, K, 2], the masks zero-padded to the largest size in the batch as the release pads."""
        canvas = (
            max(t["masks"].shape[-2] for t in targets),
            max(t["masks"].shape[-1] for t in targets),
        )
        labels, row = [], 0
        for target, (_, tgt_idx) in zip(targets, indices):
            count = len(tgt_idx)
            labels.append(sample_mask_points(
                target["masks"], point_coords[row : row + count], tgt_idx, canvas
            ).to(point_coords))
            row += count
        return torch.cat(labels)

    def get_num_masks(self, targets: List[Dict[str, Tensor]], device: torch.device) -> float:
        """Number of target masks averaged over ranks, at least 1 (the loss normaliser)."""
        num_masks = torch.as_tensor(
            [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device
        )
        world_size = comm.get_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(num_masks)
        return torch.clamp(num_masks / world_size, min=1).item()

    def compute(
        self,
        outputs: Dict[str, Tensor],
        targets: List[Dict[str, Tensor]],
        num_masks: float,
        indices: Optional[Indices] = None,
        suffix: str = "",
        losses: Optional[Iterable[str]] = None,
    ) -> Dict[str, Tensor]:
        """Loss terms of one output dict, matched by `self.matcher` unless `indices` is given.

        Keys are suffixed by `suffix`; `losses` overrides the names in `self.losses`.
        """
        if indices is None:
            indices = self.matcher(outputs, targets)
        result = {}
        for name in self.losses if losses is None else losses:
            self._check_loss_name(name)
            terms = self.loss_functions[name](outputs, targets, indices, num_masks)
            result.update({key + suffix: value for key, value in terms.items()})
        return result

    def forward(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]
    ) -> Dict[str, Tensor]:
        """Unweighted losses of the final prediction and (deep supervision) of each aux output.

        Args:
            outputs: ``pred_logits`` [B, Q, K+1], ``pred_masks`` [B, Q, H, W] and optionally
                ``aux_outputs`` (list of dicts with the same keys).
            targets: per image ``labels`` [M] and ``masks`` [M, H', W'].
        """
        num_masks = self.get_num_masks(targets, outputs["pred_logits"].device)
        losses = self.compute(outputs, targets, num_masks)
        if self.deep_supervision:
            for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
                losses.update(self.compute(aux_outputs, targets, num_masks, suffix=f"_{i}"))
        return losses

    def loss_weight(self, key: str) -> float:
        """Weight of a loss key; ``loss_x_3`` falls back to the weight of ``loss_x``."""
        if key in self.weight_dict:
            return self.weight_dict[key]
        aux = _AUX_SUFFIX.match(key)
        if aux and aux.group(1) in self.weight_dict:
            return self.weight_dict[aux.group(1)]
        raise KeyError(
            f"SetCriterion: no weight for loss '{key}' in weight_dict {sorted(self.weight_dict)}; "
            "add it when building the criterion."
        )

    def weighted(self, losses: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Multiply every loss by its weight (see `loss_weight`)."""
        return {key: value * self.loss_weight(key) for key, value in losses.items()}

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, losses={self.losses}, eos_coef={self.eos_coef}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, "
            f"deep_supervision={self.deep_supervision}"
        )
