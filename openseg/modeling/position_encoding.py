"""Fixed sine positional encoding for 2-D feature maps (DETR, Carion et al. ECCV 2020, Sec. A.4).

Normalised as in Mask2Former's release: positions 1..H (1..W) divided by H + 1e-6 (W + 1e-6)
and scaled by 2 pi; without padding masks, as the release never passes one.
"""

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine embedding of the (y, x) pixel position, `num_pos_feats` channels per axis.

    Mask2Former (Sec. 3.2.2) adds it to the pixel-decoder tokens and to the keys of the
    masked cross-attention so attention knows where each pixel lies.
    """

    def __init__(self, num_pos_feats: int, temperature: float = 10000, normalize: bool = True):
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError(
                f"PositionEmbeddingSine: num_pos_feats must be even, got {num_pos_feats}"
            )
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] (only its shape, device and dtype are used) -> [B, 2*num_pos_feats, H, W]."""
        batch, _, height, width = x.shape
        y_embed = torch.arange(1, height + 1, device=x.device, dtype=torch.float32)
        x_embed = torch.arange(1, width + 1, device=x.device, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (height + eps) * self.scale
            x_embed = x_embed / (width + eps) * self.scale
        y_embed = y_embed[:, None].expand(height, width)
        x_embed = x_embed[None, :].expand(height, width)

        dim_t = torch.arange(self.num_pos_feats, device=x.device, dtype=torch.float32)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos_x = x_embed[:, :, None] / dim_t
        pos_y = y_embed[:, :, None] / dim_t
        # interleave sin on even and cos on odd channels, as DETR does
        pos_x = torch.stack((pos_x[:, :, 0::2].sin(), pos_x[:, :, 1::2].cos()), dim=3).flatten(2)
        pos_y = torch.stack((pos_y[:, :, 0::2].sin(), pos_y[:, :, 1::2].cos()), dim=3).flatten(2)
        pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)
        return pos[None].expand(batch, -1, -1, -1).to(x.dtype)
