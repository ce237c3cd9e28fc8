"""Swin Transformer backbone (Liu et al., ICCV 2021) as Mask2Former uses it (its Sec. 4 and
model zoo: Swin-T/S/B/L, window 7 or 12, ImageNet-1k / -22k pre-training at 224 or 384 px).

Registered as ``D2SwinTransformer`` with the keys ``MODEL.SWIN.*`` of the release, so the
released configs and checkpoints read unchanged. Parameter names follow the Swin release
(``patch_embed``, ``layers.<i>.blocks.<j>.attn.qkv``, ``norm<i>``, ...): they are the format
of the ImageNet weights (`tools/convert-pretrained-swin-model-to-d2.py` of Mask2Former) and of
the model-zoo checkpoints. The relative-position index and the shifted-window mask are
recomputed from the configuration, so they are not part of the state dict.

Released behaviour kept (paper silent): inputs whose size is not a multiple of the patch or
window size are zero-padded on the right / bottom; the shifted-window mask adds -100 (not
-inf) to attention logits between regions that are not adjacent in the image; features are
layer-normalised per output stage (``norm<i>``); stochastic depth rises linearly from 0 to
``DROP_PATH_RATE`` over all blocks.
"""
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

SHIFTED_WINDOW_MASK_VALUE = -100.0  # Swin release: added to logits across window regions


def relative_position_index(window: int) -> Tensor:
    """[w*w, w*w] index into the (2w-1)^2 relative-position bias table (Swin Eq. 4): the
    offset (dy, dx) between two positions of a window, both shifted to [0, 2w-2]."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def with_release_buffers(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """`state` plus the ``relative_position_index`` buffer the Swin release saves next to each
    ``relative_position_bias_table`` (openseg recomputes it), for writing release-format files."""
    out = dict(state)
    for key, table in state.items():
        if key.endswith("attn.relative_position_bias_table"):
            window = (math.isqrt(table.shape[0]) + 1) // 2
            out[key.replace("relative_position_bias_table", "relative_position_index")] = (
                relative_position_index(window))
    return out


def to_windows(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] -> [B * H/w * W/w, w*w, C], windows in row-major order per image."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def from_windows(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of `to_windows`: [B * nW, w*w, C] -> [B, H, W, C]."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shifted_window_mask(height: int, width: int, window: int, shift: int,
                        device: torch.device) -> Tensor:
    """[nW, w*w, w*w] additive mask of the shifted windows (Swin Sec. 3.2, "efficient batch
    computation"): after the cyclic shift a window may hold up to 3 x 3 image regions that
    are not neighbours; positions of different regions must not attend to each other."""
    def region_ids(size: int) -> Tensor:
        ids = torch.zeros(size, dtype=torch.long, device=device)
        ids[size - window:size - shift] = 1
        ids[size - shift:] = 2
        return ids

    regions = region_ids(height)[:, None] * 3 + region_ids(width)[None, :]
    regions = to_windows(regions[None, :, :, None].float(), window).squeeze(-1)  # [nW, w*w]
    different = regions[:, :, None] != regions[:, None, :]
    mask = torch.zeros(different.shape, device=device)
    return mask.masked_fill(different, SHIFTED_WINDOW_MASK_VALUE)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias
    (Swin Sec. 3.2, Eq. 4)."""

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool,
                 qk_scale: Optional[float], attn_drop: float, proj_drop: float):
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """x [B*nW, N, C]; mask [nW, N, N] (additive) or None."""
        windows, tokens, channels = x.shape
        q, k, v = self.qkv(x).view(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q * self.scale) @ k.transpose(-2, -1)  # [B*nW, heads, N, N]
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
        logits = logits + bias.view(tokens, tokens, -1).permute(2, 0, 1)
        if mask is not None:
            num_windows = mask.shape[0]
            logits = logits.view(-1, num_windows, self.num_heads, tokens, tokens) + mask[:, None]
            logits = logits.view(windows, self.num_heads, tokens, tokens)
        weights = self.attn_drop(logits.softmax(dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(windows, tokens, channels)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """Two-layer GELU MLP of each block (ratio `MLP_RATIO`)."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP, each with a residual (Swin Eq. 3)."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float,
                 qkv_bias: bool, qk_scale: Optional[float], drop: float, attn_drop: float,
                 drop_path: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor, height: int, width: int, mask: Tensor) -> Tensor:
        batch, _, channels = x.shape
        y = self.norm1(x).view(batch, height, width, channels)
        pad_h, pad_w = (-height) % self.window, (-width) % self.window
        y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = height + pad_h, width + pad_w
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(to_windows(y, self.window), mask if self.shift else None)
        y = from_windows(y, self.window, padded_h, padded_w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        y = y[:, :height, :width].reshape(batch, height * width, channels)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (zero-padded to even size), normalised and
    projected from 4C to 2C channels (Swin Sec. 3.1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        batch, _, channels = x.shape
        x = x.view(batch, height, width, channels)
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # channel order of the release: (even row, even col), (odd, even), (even, odd), (odd, odd)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.flatten(1, 2)))


class SwinStage(nn.Module):
    """`depth` blocks alternating regular and shifted windows, then (except the last stage)
    patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 qkv_bias: bool, qk_scale: Optional[float], drop: float, attn_drop: float,
                 drop_path: Sequence[float], downsample: bool, use_checkpoint: bool):
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else self.shift, mlp_ratio,
                      qkv_bias, qk_scale, drop, attn_drop, drop_path[i])
            for i in range(depth)
        ])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        padded_h = -(-height // self.window) * self.window
        padded_w = -(-width // self.window) * self.window
        mask = shifted_window_mask(padded_h, padded_w, self.window, self.shift, x.device)
        for block in self.blocks:
            if self.use_checkpoint and self.training:
                x = checkpoint(block, x, height, width, mask, use_reentrant=False)
            else:
                x = block(x, height, width, mask)
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (zero-padding the input to a multiple of the patch
    size), optionally layer-normalised (`PATCH_NORM`)."""

    def __init__(self, patch_size: int, embed_dim: int, patch_norm: bool):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        pad_h, pad_w = (-x.shape[-2]) % self.patch_size, (-x.shape[-1]) % self.patch_size
        x = self.proj(F.pad(x, (0, pad_w, 0, pad_h)))
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(Backbone):
    """Swin Transformer returning ``res2``..``res5`` (strides 4..32, channels C, 2C, 4C, 8C)."""

    def __init__(self, cfg: CfgNode, input_shape: ShapeSpec):
        super().__init__()
        swin = cfg.MODEL.SWIN
        depths: List[int] = list(swin.DEPTHS)
        num_heads: List[int] = list(swin.NUM_HEADS)
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(
                f"MODEL.SWIN.DEPTHS {depths} and NUM_HEADS {num_heads} must have 4 entries "
                f"(one per stage res2..res5)")
        unknown = sorted(set(swin.OUT_FEATURES) - {"res2", "res3", "res4", "res5"})
        if unknown:
            raise ValueError(f"MODEL.SWIN.OUT_FEATURES: {unknown} not in res2..res5")
        if input_shape.channels not in (None, 3):
            raise ValueError(f"D2SwinTransformer takes 3-channel images, got {input_shape.channels}")
        embed_dim = swin.EMBED_DIM
        self.patch_embed = PatchEmbed(swin.PATCH_SIZE, embed_dim, swin.PATCH_NORM)
        self.ape = swin.APE
        if self.ape:
            grid = swin.PRETRAIN_IMG_SIZE // swin.PATCH_SIZE
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(swin.DROP_RATE)
        rates = torch.linspace(0, swin.DROP_PATH_RATE, sum(depths)).tolist()
        self.num_features = [embed_dim * 2 ** i for i in range(4)]
        self.layers = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            self.layers.append(SwinStage(
                self.num_features[i], depths[i], num_heads[i], swin.WINDOW_SIZE, swin.MLP_RATIO,
                swin.QKV_BIAS, swin.QK_SCALE, swin.DROP_RATE, swin.ATTN_DROP_RATE,
                rates[start:start + depths[i]], downsample=i < 3,
                use_checkpoint=swin.USE_CHECKPOINT,
            ))
        # one output norm per stage, as the release builds them (all four, whatever is output)
        for i in range(4):
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self._out_features = list(swin.OUT_FEATURES)
        self._out_feature_strides = {f"res{i + 2}": 4 * 2 ** i for i in range(4)}
        self._out_feature_channels = {f"res{i + 2}": self.num_features[i] for i in range(4)}
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Swin's initialisation: truncated-normal linear weights, zero biases, unit norms."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if x.dim() != 4:
            raise ValueError(f"D2SwinTransformer takes [N, C, H, W] images, got {tuple(x.shape)}")
        x = self.patch_embed(x)
        height, width = x.shape[-2:]
        if self.ape:
            x = x + F.interpolate(self.absolute_pos_embed, size=(height, width), mode="bicubic")
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        outputs: Dict[str, Tensor] = {}
        last = max(int(name[3:]) - 2 for name in self._out_features)
        for i, stage in enumerate(self.layers[:last + 1]):
            x = stage(x, height, width)
            name = f"res{i + 2}"
            if name in self._out_features:
                out = getattr(self, f"norm{i}")(x)
                outputs[name] = out.view(-1, height, width, self.num_features[i]).permute(
                    0, 3, 1, 2).contiguous()
            if stage.downsample is not None and i < last:
                x = stage.downsample(x, height, width)
                height, width = (height + 1) // 2, (width + 1) // 2
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name],
                            stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return 32

