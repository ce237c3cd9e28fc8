"""Multi-scale deformable-attention pixel decoder (Mask2Former, Cheng et al. CVPR 2022, Sec. 3.4).

A Deformable-DETR encoder (Zhu et al. ICLR 2021, Sec. 4.1, Eq. 3) mixes the stride 8/16/32
backbone maps; an FPN-style lateral path then lifts the result to stride `COMMON_STRIDE` to
produce the per-pixel mask embeddings. Deformable attention is written with
`F.grid_sample`, so no compiled extension is needed.

Where the paper is silent the release (facebookresearch/Mask2Former, `MSDeformAttnPixelDecoder`)
is followed: encoder levels ordered coarsest first with learnt level embeddings (kept also
without encoder layers), a 1024-wide encoder FFN with MODEL.MASK_FORMER.NHEADS heads and 4
points, sampling offsets in pixels of each level normalised by its (W, H), bilinear (not
nearest) upsampling in the FPN path, and float32 computation under mixed precision. Unlike the
release, the attention-weighted sum is accumulated level by level and the bilinear samples are
recomputed in backward instead of stored (same values; less time and memory,
`benchmarks/bench_vs_reference.py`).
`tests/test_reference_mask2former.py` checks the outputs against the release's on non-square
levels with query-dependent offsets.
"""

import math
from typing import Dict, List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.utils.registry import Registry
from torch import nn

from .ms_deform_attn_op import compiled_ms_deform_attn, use_compiled_op
from .position_encoding import PositionEmbeddingSine

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Pixel decoders: map backbone features to (mask_features, multi_scale_features).
Built with `build_pixel_decoder(cfg, input_shape)` by cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME.
"""


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Build the pixel decoder named by cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME."""
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    if name not in PIXEL_DECODER_REGISTRY:
        raise KeyError(
            f"cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME={name!r} is not registered; "
            f"available: {sorted(k for k, _ in PIXEL_DECODER_REGISTRY)}"
        )
    model = PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(f"Pixel decoder {name!r} must define forward_features(features)")
    return model


class _WeightedBilinearSamples(torch.autograd.Function):
    """sum_p weights[n, q, p] * bilinear_sample(value[n], grid[n, q, p]): [n, C, q].

    The same as `(F.grid_sample(value, grid) * weights[:, None]).sum(-1)`, but the samples
    ([n, C, q, P], the largest tensors of the pixel decoder: 4 x n_points x the encoder's
    activations per layer) are not kept for backward: they are sampled again there, which
    costs one grid_sample forward and saves about a quarter of a training step's peak memory.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, grid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        sampled = F.grid_sample(
            value, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        ctx.save_for_backward(value, grid, weights)
        return (sampled * weights[:, None]).sum(-1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        value, grid, weights = ctx.saved_tensors
        sampled = F.grid_sample(
            value, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        grad_output = grad_output.unsqueeze(-1)
        grad_weights = (grad_output * sampled).sum(1) if ctx.needs_input_grad[2] else None
        del sampled
        grad_value = grad_grid = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # interpolation 0 = bilinear, padding 0 = zeros, as in forward
            grad_value, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
                grad_output * weights[:, None], value, grid, 0, 0, False,
                [ctx.needs_input_grad[0], ctx.needs_input_grad[1]],
            )
        return grad_value, grad_grid, grad_weights


def ms_deform_attn_core(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention sum of Deformable DETR Eq. 3 (after value projection).

    value: [B, S, nH, Dh], the flattened levels concatenated along S.
    spatial_shapes: [L, 2] (H_l, W_l); level_start_index: [L] offset of each level in S.
    sampling_locations: [B, Lq, nH, L, P, 2] as (x, y) in [0, 1], 0 and 1 being the outer
    edges of the map (pixel i has its centre at (i + 0.5) / size).
    attention_weights: [B, Lq, nH, L, P].
    Returns [B, Lq, nH * Dh]: sum over levels and points of weight * bilinear sample,
    zero outside the map.
    """
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # grid_sample with align_corners=False maps -1 / +1 to the outer pixel edges
    sampling_grids = 2 * sampling_locations - 1
    weights = attention_weights.transpose(1, 2).reshape(
        batch * num_heads, num_queries, num_levels, num_points
    )
    # the weighted sum is accumulated level by level: stacking the samples of all levels
    # first (as the release does) costs a copy of the largest tensor of the step and a
    # second one of that size for the product
    output = None
    for level in range(num_levels):
        height, width = int(spatial_shapes[level, 0]), int(spatial_shapes[level, 1])
        start = int(level_start_index[level])
        value_level = value[:, start : start + height * width]
        # [B, H*W, nH, Dh] -> [B*nH, Dh, H, W]
        value_level = value_level.permute(0, 2, 3, 1).reshape(
            batch * num_heads, head_dim, height, width
        )
        # [B, Lq, nH, P, 2] -> [B*nH, Lq, P, 2]
        grid_level = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        term = _WeightedBilinearSamples.apply(
            value_level, grid_level, weights[:, :, level]
        )  # [B*nH, Dh, Lq]
        output = term if output is None else output + term
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR Sec. 4.1, Eq. 3).

    Each query predicts `n_points` sampling offsets per head and level around its reference
    point, plus softmax-normalised weights over all levels x points of a head.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Start with head h sampling along direction 2*pi*h/nH at distances 1..P (Deformable DETR init)."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True)[0]
        directions = directions.view(self.n_heads, 1, 1, 2).repeat(
            1, self.n_levels, self.n_points, 1
        )
        distances = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((directions * distances).view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
    ) -> torch.Tensor:
        """query [B, Lq, C], reference_points [B, Lq, L, 2] in [0, 1] as (x, y),
        input_flatten [B, S, C] -> [B, Lq, C]."""
        batch, num_queries, _ = query.shape
        num_values = input_flatten.shape[1]
        expected = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
        if num_values != expected:
            raise ValueError(
                f"MSDeformAttn: input_flatten has {num_values} tokens but spatial_shapes sum to {expected}"
            )
        head_dim = self.d_model // self.n_heads
        value = self.value_proj(input_flatten).view(batch, num_values, self.n_heads, head_dim)
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            batch, num_queries, self.n_heads, self.n_levels * self.n_points
        )
        weights = weights.softmax(-1).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points
        )
        # offsets are in pixels of each level: normalise by that level's (W, H)
        offset_normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], dim=-1).to(
            query.dtype
        )
        sampling_locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / offset_normalizer[None, None, None, :, None, :]
        )
        attend = compiled_ms_deform_attn if use_compiled_op(value) else ms_deform_attn_core
        output = attend(value, spatial_shapes, level_start_index, sampling_locations, weights)
        return self.output_proj(output)


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then FFN."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
    ) -> torch.Tensor:
        attended = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index
        )
        src = self.norm1(src + self.dropout1(attended))
        ffn_out = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn_out))


class MSDeformAttnEncoder(nn.Module):
    """Stack of deformable encoder layers over flattened multi-scale tokens."""

    def __init__(
        self,
        d_model: int = 256,
        n_heads: int = 8,
        num_layers: int = 6,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 3,
        n_points: int = 4,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                MSDeformAttnEncoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points)
                for _ in range(num_layers)
            ]
        )
        # kept also without layers, as the release (its checkpoints hold the key); it then
        # reaches no output, so it is frozen: DistributedDataParallel rejects parameters
        # without gradient
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model), requires_grad=bool(num_layers))
        nn.init.normal_(self.level_embed)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module._reset_parameters()

    @staticmethod
    def reference_points(
        spatial_shapes: torch.Tensor, num_levels: int, device: torch.device
    ) -> torch.Tensor:
        """Normalised pixel centres of every token, repeated for every level: [1, S, L, 2] as (x, y).

        Inputs carry no padding (valid ratio 1), so a token's reference point is the same
        normalised position on every level.
        """
        per_level = []
        for height, width in spatial_shapes.tolist():
            ys, xs = torch.meshgrid(
                (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height,
                (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width,
                indexing="ij",
            )
            per_level.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1))
        points = torch.cat(per_level, dim=0)
        return points[None, :, None, :].expand(1, -1, num_levels, -1)

    def forward(
        self, sources: List[torch.Tensor], pos_embeds: List[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sources/pos_embeds: one [B, C, H_l, W_l] per level.

        Returns (memory [B, S, C], spatial_shapes [L, 2], level_start_index [L]).
        """
        flat_sources, flat_pos, shapes = [], [], []
        for level, (src, pos) in enumerate(zip(sources, pos_embeds)):
            shapes.append(src.shape[-2:])
            flat_sources.append(src.flatten(2).transpose(1, 2))
            if self.layers:
                flat_pos.append(
                    pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
                )
        memory = torch.cat(flat_sources, dim=1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=memory.device)
        level_start_index = torch.cat(
            (
                spatial_shapes.new_zeros(1),
                (spatial_shapes[:, 0] * spatial_shapes[:, 1]).cumsum(0)[:-1],
            )
        )
        if not self.layers:
            return memory, spatial_shapes, level_start_index
        pos = torch.cat(flat_pos, dim=1)
        reference_points = self.reference_points(spatial_shapes, len(sources), memory.device).to(
            memory.dtype
        )
        for layer in self.layers:
            memory = layer(memory, pos, reference_points, spatial_shapes, level_start_index)
        return memory, spatial_shapes, level_start_index


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former pixel decoder (Sec. 3.4): deformable encoder on strides 8-32, FPN to stride 4."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        transformer_n_points: int,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[str],
        transformer_in_features: List[str],
        common_stride: int,
    ):
        """
        Args:
            input_shape: backbone features this decoder reads (name -> ShapeSpec).
            transformer_in_features: names fed to the deformable encoder.
            conv_dim / mask_dim: channels of the multi-scale maps / of the mask features.
            common_stride: stride of `mask_features`; every input finer than the
                finest encoder level and not finer than this gets an FPN lateral.
        """
        super().__init__()
        missing = [name for name in transformer_in_features if name not in input_shape]
        if missing:
            raise ValueError(
                f"cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES {missing} are not "
                f"among the pixel decoder inputs {sorted(input_shape)} (cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)"
            )
        # coarsest first: level 0 is the lowest resolution, as the mask decoder expects
        ordered = sorted(input_shape.items(), key=lambda item: -item[1].stride)
        self.transformer_in_features = [k for k, _ in ordered if k in transformer_in_features]
        transformer_channels = [input_shape[k].channels for k in self.transformer_in_features]
        finest_transformer_stride = min(input_shape[k].stride for k in self.transformer_in_features)
        self.common_stride = common_stride

        self.input_proj = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(channels, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim)
                )
                for channels in transformer_channels
            ]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnEncoder(
            d_model=conv_dim,
            n_heads=transformer_nheads,
            num_layers=transformer_enc_layers,
            d_ffn=transformer_dim_feedforward,
            dropout=transformer_dropout,
            n_levels=len(self.transformer_in_features),
            n_points=transformer_n_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.maskformer_num_feature_levels = 3

        # FPN path for inputs finer than the encoder levels. As in the release, the lateral /
        # output convolutions are listed finest first (its adapter_1, layer_1, ...) and run
        # coarsest first
        self.fpn_in_features = [
            k for k, shape in reversed(ordered)
            if common_stride <= shape.stride < finest_transformer_stride
        ]
        use_bias = norm == ""
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for name in self.fpn_in_features:
            lateral = Conv2d(
                input_shape[name].channels,
                conv_dim,
                kernel_size=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
            )
            output = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict:
        head = cfg.MODEL.SEM_SEG_HEAD
        missing = [k for k in head.IN_FEATURES if k not in input_shape]
        if missing:
            raise ValueError(
                f"cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES {missing} are not produced by the backbone "
                f"(it outputs {sorted(input_shape)}); fix IN_FEATURES or MODEL.*.OUT_FEATURES"
            )
        nheads = cfg.MODEL.MASK_FORMER.NHEADS
        if head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS != nheads:
            raise ValueError(
                "cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS="
                f"{head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS} differs from "
                f"cfg.MODEL.MASK_FORMER.NHEADS={nheads}: as in the released Mask2Former, the "
                "deformable encoder uses MASK_FORMER.NHEADS heads; set both to the same value."
            )
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": nheads,
            # Mask2Former uses a 1024-wide FFN in the pixel-decoder encoder
            "transformer_dim_feedforward": 1024,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": list(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            # the release hard-codes 4 points, this key's default
            "transformer_n_points": head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            "common_stride": head.COMMON_STRIDE,
        }

    def forward_features(
        self, features: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """features: backbone maps by name.

        Returns (mask_features [B, mask_dim, H/common_stride, W/common_stride],
        multi_scale_features: 3 maps of conv_dim channels, lowest resolution first).
        Runs in float32 also under mixed precision, as the release does (its deformable
        attention does not support half precision).
        """
        device_type = next(iter(features.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._forward_features({k: v.float() for k, v in features.items()})

    def _forward_features(
        self, features: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        sources, pos_embeds = [], []
        for level, name in enumerate(self.transformer_in_features):
            projected = self.input_proj[level](features[name])
            sources.append(projected)
            pos_embeds.append(self.pe_layer(projected))
        memory, spatial_shapes, level_start_index = self.transformer(sources, pos_embeds)

        batch = memory.shape[0]
        level_ends = list(level_start_index[1:].tolist()) + [memory.shape[1]]
        outputs = []
        for level, (start, end) in enumerate(zip(level_start_index.tolist(), level_ends)):
            height, width = spatial_shapes[level].tolist()
            outputs.append(memory[:, start:end].transpose(1, 2).reshape(batch, -1, height, width))

        for name, lateral_conv, output_conv in reversed(list(zip(
            self.fpn_in_features, self.lateral_convs, self.output_convs
        ))):
            lateral = lateral_conv(features[name])
            upsampled = F.interpolate(
                outputs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
            )
            outputs.append(output_conv(lateral + upsampled))

        multi_scale_features = outputs[: self.maskformer_num_feature_levels]
        return self.mask_features(outputs[-1]), multi_scale_features
