"""The three pieces MAFT+ adds to FC-CLIP (Jiao et al. ECCV 2024, "Collaborative Vision-Text
Representation Optimizing for Open-Vocabulary Segmentation").

The MAFT+ paper is not among openseg's papers, so the released code
(jiaosiyu1999/MAFT-Plus, `maft/modeling/maft/*.py`) is the specification; each function
says where the release differs from what its name suggests.
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openseg.modeling.position_encoding import PositionEmbeddingSine


class ContentDependentTransfer(nn.Module):
    """Content-Dependent Transfer: every class text embedding attends to the image's dense
    CLIP embeddings and is updated with the result, giving per-image text embeddings.

    Queries are the text embeddings (no position), keys the CLIP pixels plus a sine position
    embedding, values the CLIP pixels; one multi-head cross-attention, then a linear update.
    The release has two residual forms, chosen by whether the model was built for panoptic
    inference (`norm_on_update`): ``norm(t + W a)`` (semantic models) or ``t + norm(W a)``
    with W, b zero-initialised, so training starts from the plain text embeddings (panoptic).
    Embeddings are not re-normalised afterwards (as released).
    """

    def __init__(self, dim: int, num_heads: int, norm_on_update: bool):
        super().__init__()
        self.position = PositionEmbeddingSine(dim // 2, normalize=True)
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=0.0)
        self.norm = nn.LayerNorm(dim)
        self.update = nn.Linear(dim, dim)
        self.norm_on_update = norm_on_update
        for param in list(self.attention.parameters()) + list(self.norm.parameters()):
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        if norm_on_update:
            nn.init.zeros_(self.update.weight)
            nn.init.zeros_(self.update.bias)

    def forward(self, image_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
        """[B, E, h, w] dense CLIP embeddings, [K, E] text embeddings -> [B, K, E]."""
        batch = image_embeddings.shape[0]
        keys_pos = self.position(image_embeddings).flatten(2).permute(2, 0, 1)
        pixels = image_embeddings.flatten(2).permute(2, 0, 1)
        text = text_embeddings[:, None].expand(-1, batch, -1).to(pixels.dtype)
        attended = self.attention(query=text, key=pixels + keys_pos, value=pixels)[0]
        if self.norm_on_update:
            text = text + self.norm(self.update(attended))
        else:
            text = self.norm(text + self.update(attended))
        return text.permute(1, 0, 2)


def mask_aware_loss(
    class_logits: Tensor, mask_logits: Tensor, targets: List[dict]
) -> Tensor:
    """Mask-aware loss: the CLIP classifier's probability of a ground-truth segment's class
    for each proposal should follow how well the proposal covers that segment.

    For every ground-truth segment (class c, mask g) and every query q with mask probability
    m_q (sigmoid of its logits, bilinearly resized to the padded image): soft IoU
    sum(g m_q) / (sum g + sum m_q - sum(g m_q) + 1e-7), min-max normalised over the queries
    (+1e-8 in the denominator); smooth-L1 (beta 1) between that target (no gradient) and
    softmax_c(class_logits[q, :K])[c], averaged over all segments and queries of the batch.

    Args:
        class_logits: [B, Q, K+1] CLIP-classifier logits (last = void, left out).
        mask_logits: [B, Q, h, w] mask logits (not back-propagated through).
        targets: per image ``labels`` [N] and ``masks`` [N, H, W] (padded image size).
    """
    probs = class_logits[..., :-1].softmax(-1)
    predicted, target = [], []
    for b, per_image in enumerate(targets):
        if per_image["masks"].shape[0] == 0:
            continue
        gt = per_image["masks"]
        masks = F.interpolate(
            mask_logits[b : b + 1].detach().sigmoid(), size=gt.shape[-2:], mode="bilinear",
            align_corners=False,
        )[0].flatten(1)
        gt = gt.flatten(1).to(masks.dtype)
        intersection = gt @ masks.T
        union = gt.sum(-1, keepdim=True) + masks.sum(-1)[None] - intersection + 1e-7
        iou = intersection / union
        low, high = iou.min(-1, keepdim=True).values, iou.max(-1, keepdim=True).values
        target.append((iou - low) / (high - low + 1e-8))
        predicted.append(probs[b][:, per_image["labels"]].T)
    if not predicted:
        raise ValueError(
            "MAFT+ mask-aware loss: no image of the batch has a ground-truth segment; "
            "keep DATALOADER.FILTER_EMPTY_ANNOTATIONS True (as the release)."
        )
    return F.smooth_l1_loss(torch.cat(predicted), torch.cat(target))


def pyramid_pooling(features: Tensor, scales: Sequence[int]) -> Tensor:
    """[B, C, h, w] -> [B, D] strip descriptors: for each scale s, average pooling with a
    (w // s)-wide square window, then column sums and row sums, flattened and concatenated
    (the POD-style spatial descriptor of the release's representation compensation).

    As released, a non-square map is first resized (bilinear) to a square of its longer side,
    but the window stays `w // s` of the original width."""
    width = features.shape[-1]
    if features.shape[-1] != features.shape[-2]:
        side = max(features.shape[-2:])
        features = F.interpolate(features, size=(side, side), mode="bilinear", align_corners=False)
    descriptors = []
    for scale in scales:
        if width // scale < 1:
            raise ValueError(
                f"MAFT+ representation compensation: a CLIP feature map {width} wide cannot be "
                f"pooled at scale {scale} (cfg.MODEL.MAFT_PLUS.RC_POOL_SCALES); use larger images."
            )
        pooled = F.avg_pool2d(features, kernel_size=width // scale)
        descriptors += [pooled.sum(dim=2).flatten(1), pooled.sum(dim=3).flatten(1)]
    return torch.cat(descriptors, dim=1)


def representation_compensation_loss(
    fine_tuned: Tensor, frozen: Tensor, scales: Sequence[int]
) -> Tensor:
    """Representation compensation: keep the fine-tuned CLIP's dense features close to the
    frozen CLIP's. Both [B, C, h, w] maps (the ConvNeXt trunk output, before the CLIP head)
    are clamped at 0, described by `pyramid_pooling` and compared with smooth-L1 (beta 1,
    mean)."""
    if fine_tuned.shape != frozen.shape:
        raise ValueError(
            f"representation compensation: feature shapes differ ({tuple(fine_tuned.shape)} vs "
            f"{tuple(frozen.shape)})"
        )
    return F.smooth_l1_loss(
        pyramid_pooling(fine_tuned.clamp(min=0.0), scales),
        pyramid_pooling(frozen.clamp(min=0.0), scales),
    )
