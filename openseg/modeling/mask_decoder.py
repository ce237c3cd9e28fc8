"""Masked-attention transformer decoder (Mask2Former, Cheng et al. CVPR 2022, Sec. 3.2-3.3).

Each layer runs masked cross-attention (Sec. 3.2.1, Eq. 2-3: a query only sees pixels where
the previous prediction, resized to the level, has sigmoid >= 0.5; the attention mask is
-inf, here `True` = blocked, elsewhere), then self-attention, then an FFN (Sec. 3.2.3: cross-
before self-attention, learnable query features supervised before the first layer, no
dropout), cycling round-robin over the three pixel-decoder scales, lowest resolution first
(Sec. 3.2.2); mask and class heads predict after every layer. As in the release, a query whose
mask is empty at a level attends everywhere there (the paper does not say), the attention mask
is not back-propagated through, and ``aux_outputs`` run from the prediction on the learnable
queries to the last-but-one layer. `tests/test_reference_mask2former.py` checks every layer's
outputs and attended pixels against the release's.

Extra query groups (`QueryGroup`) ride along in the same forward: they share every weight,
may see the main queries and (optionally) the other groups; by default the main queries never
see them, so the main outputs do not change when groups are added. SegPrompt's example queries
use a group whose cross-attention is restricted to a fixed ground-truth mask.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.utils.registry import Registry
from torch import nn

from .position_encoding import PositionEmbeddingSine

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Mask-transformer decoders: (multi-scale maps, mask features) -> per-query classes and masks.
Built with `build_transformer_decoder` by cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME.
"""


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True) -> nn.Module:
    """Build the decoder named by cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    if name not in TRANSFORMER_DECODER_REGISTRY:
        raise KeyError(
            f"cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME={name!r} is not registered; "
            f"available: {sorted(k for k, _ in TRANSFORMER_DECODER_REGISTRY)}"
        )
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)


@dataclass
class QueryGroup:
    """Queries decoded alongside the main learnable queries.

    content: [B, N, D] initial query features; pos: [B, N, D] query positional embedding.
    fixed_masks: optional [B, N, h, w] bool (True = foreground); when given, the group's
    cross-attention is restricted to these masks at every layer instead of its own predictions:
    a pixel of a level is attended where the bilinearly resized mask is > 0 (the SegPrompt
    release's example masked attention, Zhu et al. 2023 Eq. 3). An all-False mask attends
    everywhere, like an empty predicted mask.
    sees_main: whether the group's self-attention may read the main queries.
    seen_by_main: whether the main queries' self-attention may read this group (then the main
        outputs depend on the group; off by default).
    sees_other_groups: whether the group's self-attention may read every other extra group.
    """

    content: torch.Tensor
    pos: torch.Tensor
    fixed_masks: Optional[torch.Tensor] = None
    sees_main: bool = True
    seen_by_main: bool = False
    sees_other_groups: bool = False


class _ResidualSublayer(nn.Module):
    """Residual sublayer with LayerNorm after the sum (post-norm) or on the input (pre-norm)."""

    def __init__(self, d_model: int, dropout: float, normalize_before: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _xavier_init(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _input(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.norm(tgt) if self.normalize_before else tgt

    def _add(self, tgt: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        tgt = tgt + self.dropout(update)
        return tgt if self.normalize_before else self.norm(tgt)


class SelfAttentionLayer(_ResidualSublayer):
    """Residual multi-head self-attention among queries."""

    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__(d_model, dropout, normalize_before)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self._xavier_init()

    def forward(
        self, tgt: torch.Tensor, query_pos: torch.Tensor, attn_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        normed = self._input(tgt)
        q = k = normed + query_pos
        return self._add(
            tgt, self.self_attn(q, k, value=normed, attn_mask=attn_mask, need_weights=False)[0]
        )


class CrossAttentionLayer(_ResidualSublayer):
    """Residual (masked) cross-attention from queries to one level of pixel features."""

    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__(d_model, dropout, normalize_before)
        self.multihead_attn = nn.MultiheadAttention(
            d_model, nhead, dropout=dropout, batch_first=True
        )
        self._xavier_init()

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        query_pos: torch.Tensor,
        attn_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        attended = self.multihead_attn(
            query=self._input(tgt) + query_pos,
            key=memory + memory_pos,
            value=memory,
            attn_mask=attn_mask,
            need_weights=False,
        )[0]
        return self._add(tgt, attended)


class FFNLayer(_ResidualSublayer):
    """Residual two-layer feed-forward block."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int,
        dropout: float = 0.0,
        normalize_before: bool = False,
    ):
        super().__init__(d_model, dropout, normalize_before)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self._xavier_init()

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self._add(tgt, self.linear2(self.dropout(F.relu(self.linear1(self._input(tgt))))))


class MLP(nn.Module):
    """Perceptron with ReLU between layers (the mask-embedding head of Mask2Former)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Mask2Former transformer decoder with optional extra query groups."""

    num_feature_levels = 3

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        dropout: float = 0.0,
    ):
        """
        Args:
            in_channels: channels of the multi-scale maps from the pixel decoder.
            num_classes: K; the class head outputs K + 1 logits (last = no object).
            dec_layers: number of transformer layers (Mask2Former's DEC_LAYERS - 1).
            mask_dim: channels of the mask features the mask embeddings are dotted with.
        """
        super().__init__()
        if dec_layers < 0:
            raise ValueError(
                f"dec_layers must be >= 0, got {dec_layers} (cfg.MODEL.MASK_FORMER.DEC_LAYERS >= 1)"
            )
        self.mask_classification = mask_classification
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(proj)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Sequential())

        self.class_predictor: Optional[nn.Module] = (
            nn.Linear(hidden_dim, num_classes + 1) if mask_classification else None
        )
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_classification: bool) -> Dict:
        mf = cfg.MODEL.MASK_FORMER
        if mf.DEC_LAYERS < 1:
            raise ValueError(
                f"cfg.MODEL.MASK_FORMER.DEC_LAYERS={mf.DEC_LAYERS}: must be >= 1 "
                "(it counts the initial prediction plus DEC_LAYERS - 1 transformer layers)"
            )
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": 1 if mf.CLASS_AGNOSTIC else cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            "dec_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            # no dropout in the decoder (Sec. 3.2.3); like the release, MASK_FORMER.DROPOUT
            # only reaches the pixel decoder's deformable encoder
        }

    def _check_groups(self, groups: List[QueryGroup], batch: int) -> None:
        for index, group in enumerate(groups):
            expected = (batch, group.content.shape[1], self.hidden_dim)
            if tuple(group.content.shape) != expected or tuple(group.pos.shape) != expected:
                raise ValueError(
                    f"extra_groups[{index}]: content {tuple(group.content.shape)} and pos "
                    f"{tuple(group.pos.shape)} must both be [B, N, hidden_dim] = {expected}"
                )
            if group.fixed_masks is not None and (
                group.fixed_masks.dim() != 4 or tuple(group.fixed_masks.shape[:2]) != expected[:2]
            ):
                raise ValueError(
                    f"extra_groups[{index}].fixed_masks has shape {tuple(group.fixed_masks.shape)}; "
                    f"expected [B, N, h, w] with B, N = {expected[:2]}"
                )

    def _self_attention_mask(self, groups: List[QueryGroup], device: torch.device) -> torch.Tensor:
        """[T, T] bool, True = may not attend: main sees main (+ groups `seen_by_main`); a group
        sees itself (+ main if `sees_main`, + all other groups if `sees_other_groups`)."""
        sizes = [self.num_queries] + [g.content.shape[1] for g in groups]
        total = sum(sizes)
        main = self.num_queries
        blocked = torch.ones(total, total, dtype=torch.bool, device=device)
        blocked[:main, :main] = False
        start = main
        for group, size in zip(groups, sizes[1:]):
            rows = slice(start, start + size)
            blocked[rows, rows] = False
            if group.sees_main:
                blocked[rows, :main] = False
            if group.seen_by_main:
                blocked[:main, rows] = False
            if group.sees_other_groups:
                blocked[rows, main:] = False
            start += size
        return blocked

    def _predict(
        self,
        output: torch.Tensor,
        mask_features: torch.Tensor,
        attn_size: Tuple[int, int],
        fixed_regions: List[Tuple[int, int, torch.Tensor]],
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prediction heads on the current queries (Sec. 3.2.1) and the next cross-attention mask.

        Returns (class logits, mask logits, decoder-normed embeddings, the un-normed query
        states, attention mask [B*nH, T, h*w] with True = blocked at the next level's size
        `attn_size`).
        """
        embeds = self.decoder_norm(output)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(embeds), mask_features)
        if self.class_predictor is None:
            logits = None
        elif getattr(self.class_predictor, "uses_masks", False):
            # a classifier that pools inside the masks (FC-CLIP's in-vocabulary head)
            logits = self.class_predictor(embeds, masks, mask_features)
        else:
            logits = self.class_predictor(embeds)

        resized = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
        # masks are detached: the attention pattern is not trained through (Mask2Former)
        blocked = (resized.sigmoid() < 0.5).flatten(2).detach()
        for start, end, fixed in fixed_regions:
            fixed_resized = (
                F.interpolate(fixed.float(), size=attn_size, mode="bilinear", align_corners=False)
                > 0
            )
            blocked[:, start:end] = ~fixed_resized.flatten(2)
        # a query whose mask is empty at this level attends everywhere instead of nowhere (no NaN)
        blocked[blocked.all(dim=-1)] = False
        attn_mask = blocked.unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1)
        return logits, masks, embeds, output, attn_mask

    def forward(
        self,
        x: List[torch.Tensor],
        mask_features: torch.Tensor,
        extra_groups: Optional[List[QueryGroup]] = None,
    ) -> Dict:
        """x: the 3 multi-scale maps (lowest resolution first); mask_features [B, mask_dim, H, W].

        Returns {"pred_logits" [B,Q,K+1], "pred_masks" [B,Q,H,W], "pred_embeds" [B,Q,D]
        (decoder-normed), "pred_queries" [B,Q,D] (the query states before the decoder norm),
        "aux_outputs": one dict per intermediate prediction, "extra": one dict per group}.
        """
        if len(x) != self.num_feature_levels:
            raise ValueError(
                f"expected {self.num_feature_levels} multi-scale feature maps, got {len(x)}"
            )
        groups = list(extra_groups or [])
        batch = mask_features.shape[0]
        self._check_groups(groups, batch)

        sizes, memories, memory_pos = [], [], []
        for level, feature in enumerate(x):
            sizes.append(tuple(feature.shape[-2:]))
            memory_pos.append(self.pe_layer(feature).flatten(2).transpose(1, 2))
            projected = (
                self.input_proj[level](feature).flatten(2)
                + self.level_embed.weight[level][None, :, None]
            )
            memories.append(projected.transpose(1, 2))

        output = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        self_attn_mask = None
        fixed_regions = []
        if groups:
            output = torch.cat([output] + [g.content for g in groups], dim=1)
            query_pos = torch.cat([query_pos] + [g.pos for g in groups], dim=1)
            self_attn_mask = self._self_attention_mask(groups, mask_features.device)
            start = self.num_queries
            for group in groups:
                end = start + group.content.shape[1]
                if group.fixed_masks is not None:
                    fixed_regions.append((start, end, group.fixed_masks))
                start = end

        predictions = []
        logits, masks, embeds, states, attn_mask = self._predict(
            output, mask_features, sizes[0], fixed_regions
        )
        predictions.append((logits, masks, embeds, states))
        for layer in range(self.num_layers):
            level = layer % self.num_feature_levels
            output = self.transformer_cross_attention_layers[layer](
                output, memories[level], memory_pos[level], query_pos, attn_mask
            )
            output = self.transformer_self_attention_layers[layer](
                output, query_pos, self_attn_mask
            )
            output = self.transformer_ffn_layers[layer](output)
            next_size = sizes[(layer + 1) % self.num_feature_levels]
            logits, masks, embeds, states, attn_mask = self._predict(
                output, mask_features, next_size, fixed_regions
            )
            predictions.append((logits, masks, embeds, states))

        result = self._pack(predictions, 0, self.num_queries)
        result["extra"] = []
        start = self.num_queries
        for group in groups:
            end = start + group.content.shape[1]
            result["extra"].append(self._pack(predictions, start, end))
            start = end
        return result

    @staticmethod
    def _pack(predictions: List[Tuple], start: int, end: int) -> Dict:
        """Slice queries [start, end) out of every prediction; the last is the final output."""
        packed = [
            {
                "pred_logits": logits[:, start:end] if logits is not None else None,
                "pred_masks": masks[:, start:end],
                "pred_embeds": embeds[:, start:end],
                "pred_queries": states[:, start:end],
            }
            for logits, masks, embeds, states in predictions
        ]
        final = packed[-1]
        final["aux_outputs"] = packed[:-1]
        return final
