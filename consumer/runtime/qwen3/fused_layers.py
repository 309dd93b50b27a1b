"""A Qwen3 decoder layer as four GEMMs with fused row kernels between them, in the model
dtype or with FP8 linear layers.

The layer's q/k/v products are one GEMM on concatenated weights, and so are gate and up.
Between the GEMMs, one kernel of :mod:`consumer.runtime.qwen3.row_kernels` does each
row-wise step together with its neighbours:

* the residual add of the previous product and the RMSNorm after it (the down product
  of one layer is added inside the next layer's input norm, so no layer writes its
  residual sum separately and ``addmm`` makes no copy of the residual stream);
* SiLU(gate) * up;
* in FP8, the quantization of each GEMM's input, inside the kernel that produces it.

FP8 (:func:`fuse_layer` with ``fp8`` naming the GEMMs): weights are quantized once, to e4m3
with one scale per output channel; activations get one scale per row (token). Either all
four GEMMs run in FP8 (:data:`FP8_ALL`), or only the two whose input comes from an RMSNorm
(:data:`FP8_NORMED`: q/k/v and gate/up, 2/3 of a layer's multiply-adds): the inputs of
the output and down projections (the attention's output, SiLU(gate) * up) have the
larger outliers that one scale per row rounds worst. The GEMMs are
``torch._scaled_mm`` with row-wise scales and model-dtype output (Hopper or newer). On the
CPU, the GEMMs run on the dequantized values (what the unit tests check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from consumer.runtime.qwen3.layers import LayerWeights
from consumer.runtime.qwen3.row_kernels import (
    FP8,
    FP8_MAX,
    MIN_SCALE,
    Rows,
    add_norm,
    quantize_rows,
    silu_mul,
)

FP8_ALL = frozenset({"qkv", "o", "gate_up", "down"})
FP8_NORMED = frozenset({"qkv", "gate_up"})


@dataclass
class Linear:
    """A bias-free linear layer: ``weight`` (out, in) in the model dtype, or FP8 with
    ``scale`` (1, out) per output channel."""

    weight: torch.Tensor
    scale: torch.Tensor | None = None

    @property
    def fp8(self) -> bool:
        return self.scale is not None

    def __call__(self, rows: Rows, out_dtype: torch.dtype) -> torch.Tensor:
        values, scales = rows
        if self.scale is None:
            return F.linear(values, self.weight)
        assert scales is not None, "an FP8 layer takes quantized rows"
        if values.is_cuda:
            return torch._scaled_mm(
                values, self.weight.t(), scale_a=scales, scale_b=self.scale, out_dtype=out_dtype
            )
        # the CPU stand-in: the same quantized values, multiplied in fp32
        dequantized = values.to(FP8).float() * scales
        return (dequantized @ (self.weight.float() * self.scale.t()).t()).to(out_dtype)


def fp8_supported(device: str) -> bool:
    """Whether ``device`` has FP8 GEMMs (a CUDA GPU of compute capability 8.9 or newer)."""
    return (
        device.startswith("cuda")
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability(device) >= (8, 9)
    )


def quantize_weight(weight: torch.Tensor) -> Linear:
    """FP8 e4m3 weights with one fp32 scale per output channel (row of ``weight``)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    quantized = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return Linear(quantized.contiguous(), scale.t().contiguous())


@dataclass
class FusedLayer:
    """One decoder layer's weights for :func:`attention_projections` and
    :func:`output_and_mlp`; the norms stay views of the model's own."""

    input_norm: torch.Tensor
    qkv: Linear  # [q; k; v] rows
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear  # [gate; up] rows
    down: Linear

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype between the GEMMs: the model's."""
        return self.input_norm.dtype


def fuse_layer(w: LayerWeights, fp8: frozenset[str] = frozenset()) -> FusedLayer:
    """Concatenated q/k/v and gate/up weights (copies); the GEMMs named in ``fp8`` (of
    qkv, o, gate_up, down) FP8-quantized."""
    with torch.no_grad():

        def linear(name: str, weight: torch.Tensor) -> Linear:
            return quantize_weight(weight) if name in fp8 else Linear(weight)

        return FusedLayer(
            input_norm=w.input_norm,
            qkv=linear("qkv", torch.cat(w.qkv)),
            q_norm=w.q_norm,
            k_norm=w.k_norm,
            o=linear("o", w.o),
            post_norm=w.post_norm,
            gate_up=linear("gate_up", torch.cat(w.gate_up)),
            down=linear("down", w.down),
        )


def attention_projections(
    x: torch.Tensor, delta: torch.Tensor | None, layer: FusedLayer, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, the q/k/v product of its input norm: (tokens, q + k + v))."""
    x, normed = add_norm(x, delta, layer.input_norm, eps, layer.qkv.fp8)
    return x, layer.qkv(normed, layer.dtype)


def output_and_mlp(
    x: torch.Tensor, attended: torch.Tensor, layer: FusedLayer, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the residual stream after attention, the MLP's output still to be added to it).

    ``attended``: (tokens, heads, head_dim), the attention's output for the rows of ``x``.
    """
    rows = attended.reshape(x.shape[0], -1)
    o = layer.o(quantize_rows(rows) if layer.o.fp8 else (rows, None), layer.dtype)
    x, normed = add_norm(x, o, layer.post_norm, eps, layer.gate_up.fp8)
    gate_up = layer.gate_up(normed, layer.dtype)
    return x, layer.down(silu_mul(gate_up, layer.down.fp8), layer.dtype)
