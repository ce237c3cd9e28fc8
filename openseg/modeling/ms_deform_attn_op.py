"""Fused multi-scale deformable attention: the compiled CUDA op when it is built, else PyTorch.

Mask2Former (Cheng et al. CVPR 2022, Sec. 3.4 / App. A) runs the sampling sum of Deformable
DETR Eq. 3 with a CUDA extension, `MultiScaleDeformableAttention`, that its users compile
from `mask2former/modeling/pixel_decoder/ops` (`sh make.sh`). When that module is importable
and the attention's tensors are on a CUDA device, `MSDeformAttn` calls it through
`FusedMSDeformAttnFunction`; otherwise it keeps the `F.grid_sample` path in
`pixel_decoder.ms_deform_attn_core`. The choice is logged once per kind of choice.

The extension exposes
`ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight,
im2col_step) -> output` and
`ms_deform_attn_backward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight,
grad_output, im2col_step) -> (grad_value, grad_sampling_loc, grad_attn_weight)`, with the same
layouts as `ms_deform_attn_core`. Its kernels take contiguous float32 / float64 tensors of one
dtype and int64 shapes on the same device; inputs are brought into that form here (under AMP
the kernel runs in float32 and the output is cast back to the value's dtype).
"""

import functools
import importlib
import logging
from types import ModuleType
from typing import Optional, Set

import torch
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

OP_MODULE_NAME = "MultiScaleDeformableAttention"
_OP_FUNCTIONS = ("ms_deform_attn_forward", "ms_deform_attn_backward")
# Deformable DETR's default: images per kernel launch; the op needs it to divide the batch
IM2COL_STEP = 128
_logged_choices: Set[str] = set()


@functools.lru_cache(maxsize=None)
def compiled_op() -> Optional[ModuleType]:
    """The compiled `MultiScaleDeformableAttention` module, or None when it is not built.

    A module of that name without the two kernels (e.g. the empty stub that makes the
    released code import on CPU) counts as not built."""
    try:
        module = importlib.import_module(OP_MODULE_NAME)
    except ImportError:
        return None
    if not all(callable(getattr(module, name, None)) for name in _OP_FUNCTIONS):
        return None
    return module


def _on_cuda(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda


def _log_once(choice: str, message: str) -> None:
    if choice not in _logged_choices:
        _logged_choices.add(choice)
        logger.info(message)


def use_compiled_op(value: torch.Tensor) -> bool:
    """Whether deformable attention over `value` runs the compiled op (and log the choice once)."""
    if compiled_op() is None:
        _log_once(
            "pytorch-no-op",
            f"MSDeformAttn: PyTorch grid_sample path ({OP_MODULE_NAME} is not built; compile it "
            "from Mask2Former's mask2former/modeling/pixel_decoder/ops for the fused CUDA kernel)",
        )
        return False
    if not _on_cuda(value):
        _log_once(
            "pytorch-device",
            f"MSDeformAttn: PyTorch grid_sample path (tensors on {value.device}; the compiled "
            f"{OP_MODULE_NAME} op runs on CUDA only)",
        )
        return False
    _log_once("compiled", f"MSDeformAttn: compiled {OP_MODULE_NAME} CUDA op")
    return True


def _im2col_step(batch: int) -> int:
    """Largest divisor of `batch` not above IM2COL_STEP (the kernel rejects other steps)."""
    return max(step for step in range(1, min(batch, IM2COL_STEP) + 1) if batch % step == 0)


class FusedMSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper of the compiled kernels; gradients flow to value, sampling
    locations and attention weights (the shapes and start indices are integer inputs)."""

    @staticmethod
    def forward(
        ctx,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        im2col_step: int,
    ) -> torch.Tensor:
        ctx.im2col_step = im2col_step
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return compiled_op().ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            im2col_step,
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
            ctx.saved_tensors
        )
        grad_value, grad_locations, grad_weights = compiled_op().ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output.contiguous(), ctx.im2col_step,
        )
        return grad_value, None, None, grad_locations, grad_weights, None


def compiled_ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """`pixel_decoder.ms_deform_attn_core` computed by the compiled op (same arguments and
    result: value [B, S, nH, Dh], spatial_shapes [L, 2], level_start_index [L],
    sampling_locations [B, Lq, nH, L, P, 2], attention_weights [B, Lq, nH, L, P]
    -> [B, Lq, nH * Dh])."""
    out_dtype = value.dtype
    dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
    output = FusedMSDeformAttnFunction.apply(
        value.to(dtype).contiguous(),
        spatial_shapes.to(device=value.device, dtype=torch.long).contiguous(),
        level_start_index.to(device=value.device, dtype=torch.long).contiguous(),
        sampling_locations.to(dtype).contiguous(),
        attention_weights.to(dtype).contiguous(),
        _im2col_step(value.shape[0]),
    )
    return output.to(out_dtype)
