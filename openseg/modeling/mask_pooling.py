"""Mask pooling: the mean of a feature map inside each predicted mask.

Open-vocabulary mask classifiers (FC-CLIP, Yu et al. NeurIPS 2023, Sec. 3.2-3.3; after ODISE,
Xu et al. CVPR 2023) pool backbone or pixel-decoder features inside each query's mask and
classify the pooled vector against text embeddings. FC-CLIP's release binarises the mask
logits (> 0) after bilinearly resizing them to the feature grid and divides by the mask area
plus 1e-8 (an empty mask pools to the zero vector); no gradient flows through the masks.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def weighted_mask_pool(features: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean of features inside each mask: [B, C, h, w], [B, Q, h, w] -> [B, Q, C].

    Binary weights give FC-CLIP's pooling; fractional weights (e.g. a ground-truth mask's
    coverage of each feature cell) give area-weighted means. A mask with no weight pools to
    the zero vector."""
    weights = weights.to(features.dtype)
    total = weights.sum(dim=(-2, -1))
    pooled = torch.einsum("bchw,bqhw->bqc", features, weights)
    return pooled / (total[..., None] + 1e-8)


def binarised_masks(mask_logits: Tensor, size: Tuple[int, int]) -> Tensor:
    """FC-CLIP's masks on a feature grid: [B, Q, H, W] logits bilinearly resized to `size`
    (align_corners False), > 0, as float 0 / 1 without gradient."""
    if tuple(mask_logits.shape[-2:]) != tuple(size):
        mask_logits = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    return (mask_logits.detach() > 0).to(mask_logits.dtype)


def mask_pool(features: Tensor, mask_logits: Tensor) -> Tensor:
    """FC-CLIP's mask pooling: [B, C, h, w] features, [B, Q, H, W] mask logits -> [B, Q, C],
    the mean of the features where the logits, bilinearly resized to (h, w), are > 0."""
    return weighted_mask_pool(features, binarised_masks(mask_logits, features.shape[-2:]))
