"""Padding-free (packed) forward of a Hugging Face Qwen3 base model, for CUDA.

All pairs of a batch are concatenated into one (T, hidden) stream and run through
the decoder layers once, with a variable-length attention kernel keeping every pair's
attention causal and private. Three savings over the padded forward:

* no padding: a batch costs exactly its real tokens;
* shared prefixes are computed once: the pairs of one request start with the same
  tokens (template, instruction, query), and requests with the same instruction start
  with the same template + instruction. The stream holds each shared stretch once (a
  prefix tree cut at those points) and each pair only as its *tail*. A segment's queries
  attend to its ancestors' keys and values plus its own, causally; its rotary positions
  continue after them. That is the same computation as the full sequences, done once per
  stretch instead of once per pair;
* the last layer runs only at each pair's last token (the only hidden state the score
  reads); its keys and values still come from every token.

Grouped-query attention goes to the kernel as is (8 key/value heads for 16 query
heads), so keys and values are never copied per query head. The attention kernel is
the grouped Triton kernel of :mod:`consumer.runtime.qwen3.varlen_attention_kernel`, which
reads each segment's keys where they are in the stream (``key_pieces``); FlashAttention-2,
for shapes that kernel cannot tile, reads them gathered (``kv_index``). q/k norm + rotary
(+ the gather, for FlashAttention-2) is one Triton kernel
(:mod:`consumer.runtime.qwen3.qk_rope_kernel`).

Each decoder layer runs as compiled regions (norm + q/k/v products; output
projection + residual + norm + MLP + residual) around those kernels. One compiled
graph serves all layers and every token count, so compiling takes seconds, not the
minutes a whole-model graph takes. Or, with ``layer_path`` (``RERANK_LAYERS``), each
layer runs as four GEMMs with fused Triton row kernels between them, in bf16 or with FP8
linear layers (:mod:`consumer.runtime.qwen3.fused_layers`). Needs CUDA and bf16/fp16.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from consumer.runtime.qwen3 import fused_layers, qk_rope_kernel
from consumer.runtime.qwen3.attention import PiecewiseAttention, VarlenAttention, default_attention
from consumer.runtime.qwen3.layers import (
    LayerWeights,
    attention_inputs,
    attention_output_and_mlp,
    layer_weights,
    projections,
)
from consumer.runtime.qwen3.layout import PackedInputs, Prefix, pack, pinned_inputs

log = logging.getLogger(__name__)

# How each decoder layer runs: compiled torch regions; the fused row kernels of
# consumer.runtime.qwen3.fused_layers with model-dtype GEMMs; or the same with FP8 GEMMs,
# all four of a layer or only the two fed by an RMSNorm
LAYER_PATHS = ("compiled", "kernels", "fp8", "fp8-normed")
_FP8_GEMMS = {"fp8": fused_layers.FP8_ALL, "fp8-normed": fused_layers.FP8_NORMED}


def supports_packing(base: torch.nn.Module) -> bool:
    """True for a bias-free SiLU Qwen3 base model without sliding-window layers."""
    config = getattr(base, "config", None)
    layer_types = getattr(config, "layer_types", None) or []
    return (
        getattr(config, "model_type", None) == "qwen3"
        and "sliding_attention" not in layer_types
        and not getattr(config, "attention_bias", False)
        and getattr(config, "hidden_act", "silu") == "silu"
    )


class PackedQwen3:
    """Runs a Qwen3 base model (``Qwen3Model``) on packed sequences.

    Args:
        base: the ``Qwen3Model`` (its weights are used in place).
        device: where it runs.
        attention: a varlen attention on gathered keys (FlashAttention-2's contract);
            tests pass a CPU stand-in.
        piecewise_attention: a varlen attention that reads each segment's keys from
            the stream in pieces (no gathered copies). With neither given: the grouped
            Triton kernel of :mod:`consumer.runtime.qwen3.varlen_attention_kernel`
            (piecewise) where it runs for the model's heads (faster on the short segments
            of reranking), else FlashAttention-2.
        graphs: a :class:`consumer.runtime.qwen3.graphs.PackedGraphs` to replay small batches
            from, once :meth:`capture_graphs` has run.
        qk_kernel: q/k norm, rotary and key gathering in one Triton kernel
            (:mod:`consumer.runtime.qwen3.qk_rope_kernel`) instead of compiled torch code
            and copies.
            None: on when the device is CUDA and the kernel runs for the head size.
        layer_path: one of :data:`LAYER_PATHS`. All but "compiled" need the q/k kernel;
            "fp8" and "fp8-normed" quantize the linear layers' weights once, here (copies:
            the model's own weights stay as they are), and need FP8 GEMMs (compute
            capability 8.9 or newer) on CUDA.
        bf16_last_layers: with "fp8" or "fp8-normed", how many of the last decoder layers
            keep model-dtype GEMMs (the embeddings, norms and head always do).
    """

    def __init__(
        self,
        base: Any,
        device: str,
        attention: VarlenAttention | None = None,
        graphs: Any = None,
        qk_kernel: bool | None = None,
        piecewise_attention: PiecewiseAttention | None = None,
        layer_path: str = "compiled",
        bf16_last_layers: int = 0,
    ) -> None:
        if bf16_last_layers < 0:
            raise ValueError(f"bf16_last_layers must not be negative, not {bf16_last_layers}")
        if layer_path not in LAYER_PATHS:
            raise ValueError(f"layer_path must be one of {LAYER_PATHS}, not {layer_path!r}")
        if not supports_packing(base):
            raise ValueError("the packed path needs a bias-free SiLU Qwen3 model")
        self.base = base
        self.device = device
        config = base.config
        self._eps = float(config.rms_norm_eps)
        self._head_dim = int(getattr(config, "head_dim", None) or 0) or (
            config.hidden_size // config.num_attention_heads
        )
        self._heads = int(config.num_attention_heads)
        self._kv_heads = int(config.num_key_value_heads)
        if attention is None and piecewise_attention is None:
            attention, piecewise_attention = default_attention(
                self._heads, self._kv_heads, self._head_dim
            )
        if (attention is None) == (piecewise_attention is None):
            raise ValueError("pass either attention or piecewise_attention, not both")
        self.attention = attention
        self.piecewise_attention = piecewise_attention
        self._q_size = self._heads * self._head_dim
        self._scale = float(self._head_dim**-0.5)
        with torch.no_grad():
            self._layers = [layer_weights(layer) for layer in base.layers]
        self._projections: Callable[..., Any] = projections
        self._attention_inputs: Callable[..., Any] = attention_inputs
        self._attention_output_and_mlp: Callable[..., torch.Tensor] = attention_output_and_mlp
        self._compiled = False
        self.graphs = graphs
        if qk_kernel is None:
            qk_kernel = device.startswith("cuda") and qk_rope_kernel.supports(self._head_dim)
        # rows of [cos | sin] per position for the kernel; never reallocated, as captured
        # graphs keep its address
        self._rotary_table = (
            qk_rope_kernel.rotary_table(
                base.rotary_emb, int(config.max_position_embeddings), base.dtype, device
            )
            if qk_kernel
            else None
        )
        self._fused: list[fused_layers.FusedLayer] | None = None
        if layer_path != "compiled":
            if self._rotary_table is None:
                raise ValueError(f"layer_path {layer_path!r} needs the q/k kernel")
            fp8 = _FP8_GEMMS.get(layer_path, frozenset())
            first_bf16 = len(self._layers) - bf16_last_layers
            self._fused = [
                fused_layers.fuse_layer(w, fp8 if i < first_bf16 else frozenset())
                for i, w in enumerate(self._layers)
            ]

    @property
    def uses_qk_kernel(self) -> bool:
        """Whether q/k norm and rotary run in :mod:`consumer.runtime.qwen3.qk_rope_kernel`."""
        return self._rotary_table is not None

    def compile(self) -> None:
        """Compile the per-layer regions; one graph each serves all layers and sizes."""
        self._projections = torch.compile(projections)
        self._attention_inputs = torch.compile(attention_inputs)
        self._attention_output_and_mlp = torch.compile(attention_output_and_mlp)
        self._compiled = True

    def prepare(
        self, seqs: Sequence[list[int]], prefixes: Sequence[Prefix] | None = None
    ) -> PackedInputs:
        """Host tensors of one packed batch (pinned on CUDA); no GPU work.

        ``prefixes[i]``: where pair i's leading ids may be shared with other pairs (one
        length, or cut points such as :attr:`consumer.runtime.prompt.EncodedPair.share_points`;
        0 or None: nothing shared). Pairs with equal leading ids share them.
        """
        inputs = pack(seqs, prefixes)
        table = self._rotary_table
        if table is not None and inputs.max_k > table.shape[0]:
            raise ValueError(
                f"a pair of {inputs.max_k} tokens is longer than the model's "
                f"max_position_embeddings ({table.shape[0]})"
            )
        if self.graphs is not None:
            inputs.graph_inputs = self.graphs.fit(inputs)
        if self.device.startswith("cuda") and inputs.graph_inputs is None:
            # a graph's layout is pinned already; only a batch run without one needs it
            inputs = pinned_inputs(inputs)
        return inputs

    def capture_graphs(self) -> None:
        """Capture the small-batch graphs (on the thread that runs the model; after compile).

        If capturing fails (e.g. out of memory on a big model), small batches run without
        graphs: slower for a lone request, otherwise the same. Logged as a warning.
        """
        if self.graphs is None:
            return
        try:
            with torch.inference_mode():
                self.graphs.capture(self.hidden_at, self.device)
        except Exception:
            log.warning("capturing CUDA graphs failed; small batches run without them",
                        exc_info=True)  # fmt: skip
            self.graphs = None
            torch.cuda.empty_cache()

    def graph_tokens(self) -> int:
        """The most stream tokens a batch may have to replay from a captured graph; 0: none."""
        return self.graphs.max_tokens if self.graphs is not None else 0

    @torch.inference_mode()
    def last_hidden_prepared(self, inputs: object) -> torch.Tensor:
        """(n, hidden) final-normed hidden states at each pair's last token."""
        assert isinstance(inputs, PackedInputs)
        if inputs.graph_inputs is not None and self.graphs is not None:
            return self.graphs.replay(inputs.graph_inputs)
        return self.hidden_at(inputs.moved(self.device))

    def last_hidden(
        self, seqs: Sequence[list[int]], prefixes: Sequence[Prefix] | None = None
    ) -> torch.Tensor:
        """(n, hidden) final-normed hidden states at each pair's last token."""
        return self.last_hidden_prepared(self.prepare(seqs, prefixes))

    def hidden_at(self, inputs: PackedInputs) -> torch.Tensor:
        """The decoder stack over one packed stream (tensors on the device): the
        final-normed hidden states at the ``last`` rows, (len(last), hidden).

        Every layer but the last runs on the whole stream; the last one only on each
        pair's last token (its keys and values still come from every token).
        """
        if self._fused is not None:
            return self._fused_hidden_at(inputs, self._fused)
        base = self.base
        x = base.embed_tokens(inputs.ids)
        rotary = self._rotary(x, inputs.positions)
        gathered = self.piecewise_attention is None  # else keys are read from the stream
        *layers, final = self._layers
        for w in layers:
            kv_index = inputs.kv_index if gathered else None
            q, k, v = self._attention_inputs_of(x, w, rotary, None, kv_index)
            attended = self._attend(
                q, k, v, inputs.cu_q, inputs.cu_k, inputs.key_pieces, inputs.max_q, inputs.max_k
            )
            x = self._output_and_mlp(x, attended, w)
        kv_index = inputs.last_kv_index if gathered else None
        q, k, v = self._attention_inputs_of(x, final, rotary, inputs.last, kv_index)
        attended = self._attend(
            q, k, v, inputs.last_cu_q, inputs.last_cu_k, inputs.last_key_pieces, 1, inputs.max_k
        )
        return base.norm(self._output_and_mlp(x.index_select(0, inputs.last), attended, final))

    def _fused_hidden_at(
        self, inputs: PackedInputs, fused: list[fused_layers.FusedLayer]
    ) -> torch.Tensor:
        """:meth:`hidden_at` through the fused layers: each layer's MLP output is added
        to the residual stream inside the next layer's input norm."""
        x = self.base.embed_tokens(inputs.ids)
        gathered = self.piecewise_attention is None
        eps = self._eps
        delta: torch.Tensor | None = None
        *layers, final = fused
        for layer in layers:
            x, qkv = fused_layers.attention_projections(x, delta, layer, eps)
            kv_index = inputs.kv_index if gathered else None
            q, k, v = self._qk_kernel_inputs(qkv, layer, inputs.positions, None, kv_index)
            attended = self._attend(
                q, k, v, inputs.cu_q, inputs.cu_k, inputs.key_pieces, inputs.max_q, inputs.max_k
            )
            x, delta = fused_layers.output_and_mlp(x, attended, layer, eps)
        x, qkv = fused_layers.attention_projections(x, delta, final, eps)
        kv_index = inputs.last_kv_index if gathered else None
        q, k, v = self._qk_kernel_inputs(qkv, final, inputs.positions, inputs.last, kv_index)
        attended = self._attend(
            q, k, v, inputs.last_cu_q, inputs.last_cu_k, inputs.last_key_pieces, 1, inputs.max_k
        )
        x, delta = fused_layers.output_and_mlp(x.index_select(0, inputs.last), attended, final, eps)
        return self.base.norm(x + delta)

    def _qk_kernel_inputs(
        self,
        qkv: torch.Tensor,
        layer: fused_layers.FusedLayer,
        positions: torch.Tensor,
        q_rows: torch.Tensor | None,
        kv_index: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of the fused q/k/v product (rows of [q | k | v]) through the q/k kernel."""
        kv_size = self._kv_heads * self._head_dim
        q, k, v = qkv.split([self._q_size, kv_size, kv_size], dim=1)
        norms = (layer.q_norm, layer.k_norm)
        return self._normed_rotated(q, k, v, *norms, positions, q_rows, kv_index)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        key_pieces: torch.Tensor,
        max_q: int,
        max_k: int,
    ) -> torch.Tensor:
        if self.piecewise_attention is not None:
            return self.piecewise_attention(q, k, v, cu_q, key_pieces, max_q, self._scale)
        assert self.attention is not None
        return self.attention(q, k, v, cu_q, cu_k, max_q, max_k, self._scale)

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the q/k step needs for rotary: (positions,) for the kernel, else (cos, sin)."""
        if self.uses_qk_kernel:
            return (positions,)
        cos, sin = self.base.rotary_emb(x, positions[None])
        return cos[0][:, None, :], sin[0][:, None, :]  # (T, 1, head_dim) broadcasts over heads

    def _attention_inputs_of(
        self,
        x: torch.Tensor,
        w: LayerWeights,
        rotary: tuple[torch.Tensor, ...],
        q_rows: torch.Tensor | None,
        kv_index: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed, rotated (rows, heads, head_dim) q of the ``q_rows`` (None: all) and k, v
        gathered by ``kv_index`` (None: the stream)."""
        self._mark_dynamic(x, *rotary)
        if self._rotary_table is not None:
            return self._kernel_attention_inputs(x, w, rotary[0], q_rows, kv_index)
        cos, sin = rotary
        q, k, v = self._attention_inputs(
            x, cos, sin, w.input_norm, w.qkv, w.q_norm, w.k_norm,
            self._eps, self._head_dim, self._q_size,
        )  # fmt: skip
        if q_rows is not None:
            q = q.index_select(0, q_rows)
        if kv_index is not None:
            k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
        return q, k, v

    def _kernel_attention_inputs(
        self,
        x: torch.Tensor,
        w: LayerWeights,
        positions: torch.Tensor,
        q_rows: torch.Tensor | None,
        kv_index: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self._projections(x, w.input_norm, w.qkv, self._eps, self._q_size)
        return self._normed_rotated(q, k, v, w.q_norm, w.k_norm, positions, q_rows, kv_index)

    def _normed_rotated(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_norm: torch.Tensor,
        k_norm: torch.Tensor,
        positions: torch.Tensor,
        q_rows: torch.Tensor | None,
        kv_index: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q/k kernel's step: (rows, heads, head_dim) q, k and v of projected rows."""
        assert self._rotary_table is not None
        table, eps = self._rotary_table, self._eps
        q = qk_rope_kernel.norm_rope(q, self._heads, q_norm, table, positions, eps, q_rows)
        k = qk_rope_kernel.norm_rope(k, self._kv_heads, k_norm, table, positions, eps, kv_index)
        if kv_index is None:
            v = v.view(v.shape[0], self._kv_heads, self._head_dim)
        else:
            v = qk_rope_kernel.gather_heads(v, self._kv_heads, kv_index)
        return q, k, v

    def _output_and_mlp(
        self, x: torch.Tensor, attended: torch.Tensor, w: LayerWeights
    ) -> torch.Tensor:
        self._mark_dynamic(x, attended)
        return self._attention_output_and_mlp(
            x, attended, w.o, w.post_norm, w.gate_up, w.down, self._eps
        )

    def _mark_dynamic(self, *tensors: torch.Tensor) -> None:
        """The token count varies per batch: compile it as a symbol from the first call."""
        if self._compiled:
            for t in tensors:
                torch._dynamo.maybe_mark_dynamic(t, 0)
