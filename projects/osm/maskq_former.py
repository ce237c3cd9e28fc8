"""MaskQ-Former (OSM, Yang et al., Sec. 3.2): learned queries that summarise one mask of an
image for the LLM.

Three kinds of queries share every weight of one transformer (self-attention over all queries,
masked cross-attention to the image features, FFN):

* mask queries cross-attend only to the feature cells the mask covers;
* context queries cross-attend to the mask's bounding box enlarged by `context_ratio` (its
  surroundings, which disambiguate e.g. "water" vs "sky");
* one mode query (vocabulary-specific per training dataset, or vocabulary-agnostic) sees the
  whole image and tells the model which naming convention to follow.

Only the mask-query outputs are passed on (projected to the LLM's embedding size). All masks of
an image run as one batch over the shared image features.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaskQFormer", "MaskQFormerLayer", "context_region", "mask_region"]


def mask_region(masks: Tensor, grid: Tuple[int, int]) -> Tensor:
    """bool [M, h, w]: feature cells a mask overlaps. `masks` [M, H, W] are at the padded image
    resolution, an integer multiple of `grid`. A cell is in the region when any of its pixels is;
    an empty mask gets the whole grid (its queries must attend somewhere)."""
    fraction = F.adaptive_avg_pool2d(masks.float()[:, None], grid)[:, 0]
    region = fraction > 0
    empty = ~region.flatten(1).any(dim=1)
    region[empty] = True
    return region


def context_region(masks: Tensor, grid: Tuple[int, int], ratio: float) -> Tensor:
    """bool [M, h, w]: cells whose centre lies in the mask's box enlarged by `ratio` (each side
    grows by ratio/2 of the box size), united with `mask_region`."""
    num_masks, height, width = masks.shape
    cell_h, cell_w = height / grid[0], width / grid[1]
    ys = (torch.arange(grid[0], device=masks.device) + 0.5) * cell_h
    xs = (torch.arange(grid[1], device=masks.device) + 0.5) * cell_w
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    index_h = torch.arange(height, device=masks.device)
    index_w = torch.arange(width, device=masks.device)
    big = max(height, width) + 1
    y0 = torch.where(rows, index_h, big).min(dim=1).values.float()
    y1 = torch.where(rows, index_h, -1).max(dim=1).values.float() + 1
    x0 = torch.where(cols, index_w, big).min(dim=1).values.float()
    x1 = torch.where(cols, index_w, -1).max(dim=1).values.float() + 1
    grow_y, grow_x = (y1 - y0) * ratio / 2, (x1 - x0) * ratio / 2
    inside_y = (ys[None] >= (y0 - grow_y)[:, None]) & (ys[None] <= (y1 + grow_y)[:, None])
    inside_x = (xs[None] >= (x0 - grow_x)[:, None]) & (xs[None] <= (x1 + grow_x)[:, None])
    box = inside_y[:, :, None] & inside_x[:, None, :]
    return box | mask_region(masks, grid)


class MaskQFormerLayer(nn.Module):
    """Pre-norm block: self-attention over all queries, masked cross-attention, FFN."""

    def __init__(self, dim: int, num_heads: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim_feedforward), nn.GELU(), nn.Linear(dim_feedforward, dim)
        )
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, queries: Tensor, memory: Tensor, blocked: Tensor) -> Tensor:
        """queries [M, Q, D], memory [M, N, D], blocked bool [M * heads, Q, N] (True = masked)."""
        x = self.norm1(queries)
        queries = queries + self.self_attn(x, x, x, need_weights=False)[0]
        x = self.norm2(queries)
        queries = (
            queries + self.cross_attn(x, memory, memory, attn_mask=blocked, need_weights=False)[0]
        )
        return queries + self.ffn(self.norm3(queries))


class MaskQFormer(nn.Module):
    """Mask / context / mode queries -> [M, num_mask_queries, out_dim] prefix embeddings."""

    def __init__(
        self,
        feature_dim: int,
        dim: int,
        out_dim: int,
        num_layers: int,
        num_heads: int,
        dim_feedforward: int,
        num_mask_queries: int,
        num_context_queries: int,
        num_modes: int,
        context_ratio: float,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_mask_queries = num_mask_queries
        self.num_context_queries = num_context_queries
        self.context_ratio = context_ratio
        self.input_proj = nn.Linear(feature_dim, dim)
        self.mask_queries = nn.Parameter(torch.randn(num_mask_queries, dim) * 0.02)
        self.context_queries = nn.Parameter(torch.randn(num_context_queries, dim) * 0.02)
        self.mode_queries = nn.Embedding(num_modes, dim)
        nn.init.normal_(self.mode_queries.weight, std=0.02)
        self.layers = nn.ModuleList(
            MaskQFormerLayer(dim, num_heads, dim_feedforward) for _ in range(num_layers)
        )
        self.out_norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, out_dim)

    def attention_blocked(self, masks: Tensor, grid: Tuple[int, int]) -> Tensor:
        """bool [M, Q, h*w], True where a query may not look: query order is mode, mask
        queries, context queries."""
        mask_cells = mask_region(masks, grid).flatten(1)
        context_cells = context_region(masks, grid, self.context_ratio).flatten(1)
        num_masks, cells = mask_cells.shape
        allowed = torch.cat(
            [
                torch.ones(num_masks, 1, cells, dtype=torch.bool, device=masks.device),
                mask_cells[:, None].expand(-1, self.num_mask_queries, -1),
                context_cells[:, None].expand(-1, self.num_context_queries, -1),
            ],
            dim=1,
        )
        return ~allowed

    def forward(self, features: Tensor, masks: Tensor, mode: int) -> Tensor:
        """features [C, h, w] of one image, masks bool [M, H, W] at its padded resolution,
        `mode` the mode-query index. Returns the projected mask-query outputs [M, Nm, out]."""
        grid = tuple(features.shape[-2:])
        num_masks = masks.shape[0]
        memory = self.input_proj(features.flatten(1).T)[None].expand(num_masks, -1, -1)
        mode_query = self.mode_queries.weight[mode][None]
        queries = torch.cat([mode_query, self.mask_queries, self.context_queries])
        queries = queries[None].expand(num_masks, -1, -1)
        blocked = self.attention_blocked(masks, grid).repeat_interleave(self.num_heads, dim=0)
        for layer in self.layers:
            queries = layer(queries, memory, blocked)
        mask_out = queries[:, 1 : 1 + self.num_mask_queries]
        return self.out_proj(self.out_norm(mask_out))
