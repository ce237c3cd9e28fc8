"""Dispatch between the compiled `MultiScaleDeformableAttention` op and the PyTorch path.

A stub op module in `sys.modules` stands for the compiled extension: it checks the layout
it receives (the kernels' contract: contiguous float tensors of one dtype, int64 shapes,
an im2col step dividing the batch) and computes the attention with a gather-based bilinear
sum of its own, so the fused path must reproduce the `grid_sample` path, forward and
backward, only through correct arguments. CUDA is faked by patching the device check."""

import logging
import sys
import types

import pytest
import torch

from openseg.modeling import ms_deform_attn_op as op
from openseg.modeling.pixel_decoder import MSDeformAttn

SHAPES = [(3, 5), (2, 3)]  # non-square levels
STARTS = [0, 15]
COMPILED_MESSAGE = "MSDeformAttn: compiled MultiScaleDeformableAttention CUDA op"


def _bilinear_gather(value, spatial_shapes, level_start_index, locations, weights):
    """Deformable DETR Eq. 3 by explicit corner gathers (zero outside the map)."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = value.new_zeros(batch, queries, heads, head_dim)
    b_idx = torch.arange(batch).view(batch, 1, 1, 1)
    h_idx = torch.arange(heads).view(1, 1, heads, 1)
    for level in range(levels):
        height, width = (int(v) for v in spatial_shapes[level])
        start = int(level_start_index[level])
        x = locations[:, :, :, level, :, 0] * width - 0.5  # [B, Lq, nH, P]
        y = locations[:, :, :, level, :, 1] * height - 0.5
        x0, y0 = x.floor(), y.floor()
        for xi in (x0, x0 + 1):
            for yi in (y0, y0 + 1):
                corner = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
                flat = (start + yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)).long()
                sampled = value[b_idx, flat, h_idx]  # [B, Lq, nH, P, Dh]
                scale = corner * inside * weights[:, :, :, level]
                out = out + (scale[..., None] * sampled).sum(dim=3)
    return out.reshape(batch, queries, heads * head_dim)


class _StubOp:
    """What the compiled extension offers, with its input contract checked."""

    def __init__(self):
        self.forward_calls = []
        self.backward_calls = 0

    def _check(self, value, spatial_shapes, level_start_index, locations, weights, step):
        for tensor in (value, spatial_shapes, level_start_index, locations, weights):
            assert tensor.is_contiguous()
        assert spatial_shapes.dtype == level_start_index.dtype == torch.long
        assert value.dtype == locations.dtype == weights.dtype
        assert value.dtype in (torch.float32, torch.float64)
        assert value.shape[0] % step == 0 and step <= 128

    def ms_deform_attn_forward(self, value, spatial_shapes, level_start_index, locations, weights,
                               step):
        self._check(value, spatial_shapes, level_start_index, locations, weights, step)
        self.forward_calls.append(
            dict(value=value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                 locations=locations, weights=weights, step=step)
        )
        with torch.no_grad():
            return _bilinear_gather(value, spatial_shapes, level_start_index, locations, weights)

    def ms_deform_attn_backward(self, value, spatial_shapes, level_start_index, locations, weights,
                                grad_output, step):
        self._check(value, spatial_shapes, level_start_index, locations, weights, step)
        assert grad_output.is_contiguous()
        self.backward_calls += 1
        inputs = [t.detach().requires_grad_(True) for t in (value, locations, weights)]
        with torch.enable_grad():
            out = _bilinear_gather(inputs[0], spatial_shapes, level_start_index, *inputs[1:])
            return list(torch.autograd.grad(out, inputs, grad_output))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """Forget the cached op lookup and the logged choices; collect the module's log lines."""
    op.compiled_op.cache_clear()
    monkeypatch.setattr(op, "_logged_choices", set())
    records = _Records()
    op.logger.addHandler(records)
    # other tests' libraries may disable existing loggers (logging.config) or all logging
    monkeypatch.setattr(op.logger, "disabled", False)
    monkeypatch.setattr(logging.root.manager, "disable", logging.NOTSET)
    level = op.logger.level
    op.logger.setLevel(logging.INFO)  # setLevel also drops the loggers' cached decisions
    yield records
    op.logger.setLevel(level)
    op.logger.removeHandler(records)
    op.compiled_op.cache_clear()


def _install(monkeypatch, module):
    monkeypatch.setitem(sys.modules, op.OP_MODULE_NAME, module)


def _stub_module(stub):
    module = types.ModuleType(op.OP_MODULE_NAME)
    module.ms_deform_attn_forward = stub.ms_deform_attn_forward
    module.ms_deform_attn_backward = stub.ms_deform_attn_backward
    return module


def _attention_and_inputs(batch=2):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    with torch.no_grad():  # non-zero offsets and non-uniform weights
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.5)
    total = sum(h * w for h, w in SHAPES)
    query = torch.randn(batch, total, 8, requires_grad=True)
    memory = torch.randn(batch, total, 8, requires_grad=True)
    reference = torch.rand(batch, total, 2, 2)
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    starts = torch.tensor(STARTS, dtype=torch.long)
    return attn, (query, reference, memory, shapes, starts)


def _outputs_and_grads(attn, inputs):
    attn.zero_grad()
    for tensor in (inputs[0], inputs[2]):
        tensor.grad = None
    out = attn(*inputs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in attn.named_parameters()}
    grads["query"], grads["memory"] = inputs[0].grad.clone(), inputs[2].grad.clone()
    return out.detach(), grads


def test_compiled_op_on_cuda_matches_pytorch_path(monkeypatch, fresh_dispatch):
    attn, inputs = _attention_and_inputs(batch=3)
    _install(monkeypatch, None)  # import fails: PyTorch path
    expected_out, expected_grads = _outputs_and_grads(attn, inputs)

    op.compiled_op.cache_clear()
    stub = _StubOp()
    _install(monkeypatch, _stub_module(stub))
    monkeypatch.setattr(op, "_on_cuda", lambda tensor: True)
    out, grads = _outputs_and_grads(attn, inputs)

    assert len(stub.forward_calls) == 1 and stub.backward_calls == 1
    call = stub.forward_calls[0]
    total = sum(h * w for h, w in SHAPES)
    assert call["value"].shape == (3, total, 2, 4)
    assert call["locations"].shape == (3, total, 2, 2, 2, 2)
    assert call["weights"].shape == (3, total, 2, 2, 2)
    assert call["spatial_shapes"].tolist() == [list(s) for s in SHAPES]
    assert call["level_start_index"].tolist() == STARTS
    assert call["step"] == 3
    # softmax over levels x points of each head
    torch.testing.assert_close(call["weights"].sum(dim=(-1, -2)), torch.ones(3, total, 2))
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=0)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-5, rtol=0, msg=name)
    assert fresh_dispatch.messages[-1] == COMPILED_MESSAGE


def test_cpu_tensors_use_pytorch_path_even_when_op_is_built(monkeypatch, fresh_dispatch):
    stub = _StubOp()
    _install(monkeypatch, _stub_module(stub))
    attn, inputs = _attention_and_inputs()
    attn(*inputs).sum().backward()
    assert stub.forward_calls == [] and stub.backward_calls == 0
    assert len(fresh_dispatch.messages) == 1
    assert "PyTorch grid_sample path (tensors on cpu" in fresh_dispatch.messages[0]


@pytest.mark.parametrize("module", [None, types.ModuleType(op.OP_MODULE_NAME)],
                         ids=["not-importable", "empty-stub"])
def test_missing_or_empty_op_uses_pytorch_path_on_cuda(monkeypatch, fresh_dispatch, module):
    """An empty module of that name (the stub that lets the released code import on CPU)
    is no compiled op either."""
    _install(monkeypatch, module)
    monkeypatch.setattr(op, "_on_cuda", lambda tensor: True)
    attn, inputs = _attention_and_inputs()
    attn(*inputs).sum().backward()
    assert op.compiled_op() is None
    assert len(fresh_dispatch.messages) == 1
    assert "MultiScaleDeformableAttention is not built" in fresh_dispatch.messages[0]


def test_choice_is_logged_once(monkeypatch, fresh_dispatch):
    stub = _StubOp()
    _install(monkeypatch, _stub_module(stub))
    monkeypatch.setattr(op, "_on_cuda", lambda tensor: True)
    attn, inputs = _attention_and_inputs()
    for _ in range(3):
        attn(*inputs).sum().backward()
    assert len(stub.forward_calls) == 3
    assert fresh_dispatch.messages == [COMPILED_MESSAGE]


def test_half_precision_runs_kernel_in_float32(monkeypatch, fresh_dispatch):
    """The kernels dispatch on float / double only: half inputs (AMP) are widened and the
    output returns in the value's dtype."""
    stub = _StubOp()
    _install(monkeypatch, _stub_module(stub))
    torch.manual_seed(0)
    total = sum(h * w for h, w in SHAPES)
    value = torch.randn(2, total, 2, 4).half()
    locations = torch.rand(2, 5, 2, 2, 2, 2)
    weights = torch.rand(2, 5, 2, 2, 2).half()
    shapes, starts = torch.tensor(SHAPES), torch.tensor(STARTS)
    out = op.compiled_ms_deform_attn(value, shapes, starts, locations, weights)
    assert out.dtype == torch.float16
    call = stub.forward_calls[0]
    assert call["value"].dtype == call["weights"].dtype == torch.float32
    expected = _bilinear_gather(value.float(), shapes, starts, locations, weights.float())
    torch.testing.assert_close(out, expected.half())


@pytest.mark.parametrize(
    "batch,step", [(1, 1), (3, 3), (128, 128), (200, 100), (256, 128), (131, 1)]
)
def test_im2col_step_divides_batch(batch, step):
    assert op._im2col_step(batch) == step
