"""Triton kernels for the row-wise steps between the GEMMs of a Qwen3 layer, each fused with
what comes before and after it so that an activation is read and written once.

* ``add_norm(x, delta, weight, eps, quantize)``: the residual add (``x + delta``) and
  the RMSNorm after it in one pass; returns the new residual stream and the normed rows.
  The add used to be a copy of ``x`` that ``addmm`` made for its output, then a separate
  norm kernel read the sum back.
* ``silu_mul(gate_up, quantize)``: SiLU(gate) * up of the fused gate/up product.
* ``quantize_rows(x)``: the attention output, for an FP8 output projection.

With ``quantize`` the normed (or multiplied) rows come out as FP8 e4m3 with one fp32
scale per row (its largest magnitude over 448), ready for ``torch._scaled_mm``: the
quantization costs no pass of its own. Without it they come out in the model dtype.

The arithmetic follows Hugging Face's Qwen3 in order and rounding: the residual add rounds
to the model dtype; RMSNorm normalizes in fp32, rounds, then scales and rounds; SiLU
rounds before the product. Runs on CUDA, or on the CPU in Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the unit tests check it.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch wheels for Linux ship triton
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
# a row of zeros gets this scale instead of 0 (its values quantize to 0 either way)
MIN_SCALE = 1e-12

Rows = tuple[torch.Tensor, torch.Tensor | None]  # values, and their per-row scales if FP8


def add_norm(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    quantize: bool,
) -> tuple[torch.Tensor, Rows]:
    """(x + delta, RMSNorm(x + delta) * weight); ``delta`` None: no add (x comes back as is).

    The normed rows are FP8 with per-row scales when ``quantize``, else in x's dtype.
    """
    _check_rows(x)
    total = x if delta is None else torch.empty_like(x)
    if delta is not None:
        _check_rows(delta)
    out, scales = _outputs(x.shape[0], x.shape[1], x, quantize)
    if x.shape[0]:
        _add_norm_rows[(x.shape[0],)](
            x, delta if delta is not None else x, total, weight, out, scales if quantize else x,
            x.shape[1], x.stride(0), delta.stride(0) if delta is not None else 0, eps,
            BLOCK=triton.next_power_of_2(x.shape[1]), ADD=delta is not None, QUANTIZE=quantize,
            num_warps=_warps(x.shape[1]),
        )  # fmt: skip
    return total, (out, scales)


def silu_mul(gate_up: torch.Tensor, quantize: bool) -> Rows:
    """SiLU(gate) * up of (tokens, 2 * intermediate) rows holding [gate | up]."""
    _check_rows(gate_up)
    width = gate_up.shape[1] // 2
    out, scales = _outputs(gate_up.shape[0], width, gate_up, quantize)
    if gate_up.shape[0]:
        _silu_mul_rows[(gate_up.shape[0],)](
            gate_up, out, scales if quantize else gate_up, width, gate_up.stride(0),
            BLOCK=triton.next_power_of_2(width), QUANTIZE=quantize, num_warps=_warps(width),
        )  # fmt: skip
    return out, scales


def quantize_rows(x: torch.Tensor) -> Rows:
    """FP8 rows of ``x`` with per-row scales."""
    _check_rows(x)
    out, scales = _outputs(x.shape[0], x.shape[1], x, True)
    if x.shape[0]:
        _add_norm_rows[(x.shape[0],)](
            x, x, x, x, out, scales, x.shape[1], x.stride(0), 0, 0.0,
            BLOCK=triton.next_power_of_2(x.shape[1]), ADD=False, QUANTIZE=True, NORM=False,
            num_warps=_warps(x.shape[1]),
        )  # fmt: skip
    return out, scales


def _check_rows(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("expected (tokens, width) rows, contiguous in their last dimension")


def _outputs(
    rows: int, width: int, like: torch.Tensor, quantize: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not quantize:
        return torch.empty(rows, width, dtype=like.dtype, device=like.device), None
    out = torch.empty(rows, width, dtype=FP8, device=like.device)
    # (rows, 1): the shape torch._scaled_mm takes for row-wise scales
    return out, torch.empty(rows, 1, dtype=torch.float32, device=like.device)


def _warps(width: int) -> int:
    return 4 if width <= 2048 else 8 if width <= 8192 else 16


if triton is not None:

    @triton.jit
    def _store_rows(out_ptr, scale_ptr, row, y, cols, mask, width, QUANTIZE: tl.constexpr):
        """Write one row: as is (already in the output dtype) or FP8 with its scale."""
        out = out_ptr + row * width + cols
        if QUANTIZE:
            values = y.to(tl.float32)
            amax = tl.max(tl.abs(tl.where(mask, values, 0.0)), axis=0)
            scale = tl.maximum(amax / 448.0, 1e-12)
            q = tl.clamp(values / scale, -448.0, 448.0)
            tl.store(out, q.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(scale_ptr + row, scale)
        else:
            tl.store(out, y, mask=mask)

    @triton.jit
    def _add_norm_rows(
        x_ptr,
        delta_ptr,
        total_ptr,
        weight_ptr,
        out_ptr,
        scale_ptr,
        width,
        x_stride,
        delta_stride,
        eps,
        BLOCK: tl.constexpr,
        ADD: tl.constexpr,
        QUANTIZE: tl.constexpr,
        NORM: tl.constexpr = True,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        dtype = x.dtype
        if ADD:
            d = tl.load(delta_ptr + row * delta_stride + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(dtype)
            tl.store(total_ptr + row * width + cols, x, mask=mask)
        y = x
        if NORM:
            h = x.to(tl.float32)
            mean_square = tl.sum(h * h, axis=0) / width
            normed = (h * tl.rsqrt(mean_square + eps)).to(dtype).to(tl.float32)
            w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            y = (normed * w).to(dtype)
        _store_rows(out_ptr, scale_ptr, row, y, cols, mask, width, QUANTIZE)

    @triton.jit
    def _silu_mul_rows(
        gate_up_ptr,
        out_ptr,
        scale_ptr,
        width,
        stride,
        BLOCK: tl.constexpr,
        QUANTIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        gate = tl.load(gate_up_ptr + row * stride + cols, mask=mask, other=0.0)
        up = tl.load(gate_up_ptr + row * stride + width + cols, mask=mask, other=0.0)
        dtype = gate.dtype
        g = gate.to(tl.float32)
        activated = (g * tl.sigmoid(g)).to(dtype).to(tl.float32)
        y = (activated * up.to(tl.float32)).to(dtype)
        _store_rows(out_ptr, scale_ptr, row, y, cols, mask, width, QUANTIZE)
