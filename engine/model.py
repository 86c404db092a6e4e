"""The Llama-family forward pass (Llama, Qwen2, Mistral) over a flat batch and the paged KV cache.

One call runs T tokens of many sequences at once (prefill chunks first, then decode tokens, as
``engine.attention`` lays them out); every layer's work is batched over T, and only attention looks
at sequence boundaries. Hyperparameters (``ModelConfig``), immutable weights (``ModelWeights``) and
the mutable KV cache (owned by the caller) are separate things.

Numerics match transformers' Llama/Qwen2/Mistral modules: RMSNorm in fp32 cast back before the weight
multiply, rotary cos/sin from fp32 angles (``engine.rope``), attention scale 1/sqrt(head_dim), the
lm_head matmul in the run dtype and only then widened to fp32.

Tensor parallel (``tp``, engine/parallel.py): the weights are this rank's shard, the heads and KV
pool its own; the output and down projections are all-reduced and the LM head's vocabulary pieces
gathered to rank 0. With ``tp=None`` (one rank) nothing changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.attention import AttentionBackend, AttentionMetadata, as_decode_queries
from engine.attention_backends import get_backend
from engine.config import ModelConfig
from engine.kernels.cpu_decode import DecodePlan
from engine.kernels.cpu_fused import FusedCpuOps, LayerOps, TorchLayerOps
from engine.kv_layout import KVLayout, torch_dtype
from engine.kv_quant import QuantizedKVAttention
from engine.linear import Linear, make_linear, resolve
from engine.parallel import ShardInfo, TPGroup, shard_info, shard_weights
from engine.quant.method import cat_rows, embedding, resolve_mode
from engine.quant.weight import Weight, dense, is_quantized
from engine.rope import RotaryTables
from engine.weights import LayerWeights, ModelWeights, load_weights


class Model:
    """A loaded checkpoint: ``forward`` over the paged cache, then ``compute_logits`` on the rows
    the caller wants to sample from (usually the last token of each sequence)."""

    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        attn_backend: str = "auto",
        device: str | torch.device = "cpu",
        linear_backend: str = "auto",
        tp: TPGroup | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        """``weights`` are already this rank's shard when ``tp`` has more than one rank.
        ``kv_cache_dtype``: auto (the run dtype) | fp8_e4m3 | int8 (engine/kv_quant.py)."""
        self.config = config
        self.weights = weights
        self.device = torch.device(device)
        self.tp = tp or TPGroup.single(self.device)
        self.shard: ShardInfo = shard_info(config, self.tp.rank, self.tp.size)
        self.dtype = torch_dtype(config.dtype)
        self.attn: AttentionBackend = get_backend(attn_backend, device)
        self.kv_dtype = KVLayout(1, 1, 1, 1, kv_dtype=kv_cache_dtype).kv_dtype  # validated
        if self.kv_dtype != "auto":  # rows quantized as written, dequantized per block as read
            decode_kernel = bool(getattr(self.attn, "kernel", False))
            self.attn = QuantizedKVAttention(self.attn, self.kv_dtype, decode_kernel)
        self.rope = RotaryTables.build(config, self.dtype, self.device)  # cached once per model
        self.scale = config.head_dim**-0.5
        self.linear_backend = resolve(linear_backend, self.dtype, self.device)
        self.layers = [_LayerLinears.build(w, self.linear_backend) for w in weights.layers]
        self.lm_head = make_linear(weights.lm_head, None, self.linear_backend)
        # the residual add + RMSNorm and rope + KV write: fused C with the CPU attention kernel (fp32),
        # transformers' torch expressions otherwise; both give the same floats
        self.ops: LayerOps = TorchLayerOps(self.rope, self.attn, config.head_dim)
        if getattr(self.attn, "kernel", False) and self.dtype == torch.float32 and self.device.type == "cpu":
            self.ops = FusedCpuOps.create(self.rope, config.head_dim) or self.ops
        # a decode-only step on one rank, all C kernels: one C call per layer (engine/kernels/cpu_decode.py)
        self.decode_plan: DecodePlan | None = None
        if not self.tp.distributed:
            self.decode_plan = DecodePlan.create(
                [lin.kernels for lin in self.layers],
                [(w.input_norm, w.post_norm) for w in weights.layers],
                weights.norm,
                self.ops,
                self.attn,
                self.shard.num_heads,
                self.shard.num_kv_heads,
                config.head_dim,
                config.rms_norm_eps,
                self.scale,
            )

    def kv_layout(self, block_size: int) -> KVLayout:
        """This rank's KV pool layout: the checkpoint's, with only the KV heads this rank holds."""
        layout = self.config.kv_layout(block_size)
        return dataclasses.replace(layout, num_kv_heads=self.shard.num_kv_heads, kv_dtype=self.kv_dtype)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions (T,) int64; kv_cache (L, N, 2, H_kv, B, D). Writes this step's K/V at
        ``meta.slot_mapping`` in every layer; returns the final-norm hidden states (T, hidden).

        ``on_layer(i)`` (optional) runs as soon as layer ``i``'s K/V are in ``kv_cache``, so a prefill
        worker can ship that layer while the next ones are computed."""
        c, tp = self.config, self.tp
        T, H, D, eps, ops = input_ids.shape[0], self.shard.num_heads, c.head_dim, c.rms_norm_eps, self.ops
        x = embedding(self.weights.embed, input_ids, self.dtype)  # (T, hidden), a fresh tensor
        if self.decode_plan is not None and T:
            # every token as a decode query (prefill chunks too: attention.as_decode_queries), the
            # same kernels called from C, one call per layer
            return self.decode_plan.forward(x, positions, kv_cache, as_decode_queries(meta), on_layer)
        state = ops.prepare(positions, meta.slot_mapping, kv_cache.shape[1] * kv_cache.shape[4])  # N * B
        delta: torch.Tensor | None = None  # the previous layer's MLP output, not yet added to x
        for i, (w, lin) in enumerate(zip(self.weights.layers, self.layers, strict=True)):
            # attention block
            x, h = ops.add_rms_norm(x, delta, w.input_norm, eps)  # (T, hidden) each
            q, k, v = lin.qkv(h)  # (T, H*D), (T, H_kv*D), (T, H_kv*D): this rank's heads
            q = ops.rope_write_kv(q, k, v, state, kv_cache[i])  # (T, H, D)
            if on_layer is not None:
                on_layer(i)
            o = self.attn.forward(q, kv_cache[i], meta, self.scale)  # (T, H, D)
            # SwiGLU MLP block
            attn_out = tp.all_reduce(lin.o(o.reshape(T, H * D)))  # (T, hidden), summed over ranks
            x, h = ops.add_rms_norm(x, attn_out, w.post_norm, eps)
            gate, up = lin.gate_up(h)  # (T, I/tp) each, fresh outputs: in place is safe
            delta = tp.all_reduce(lin.down(F.silu(gate, inplace=True).mul_(up)))  # (T, hidden)
        return ops.add_rms_norm(x, delta, self.weights.norm, eps)[1]  # (T, hidden)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(S, hidden) -> (S, vocab) fp32. With tensor parallelism every rank calls it (the
        vocabulary pieces are gathered): rank 0 gets the logits, the others an empty (S, 0)."""
        local = self.lm_head(hidden).float()  # (S, V/tp), padded on the last rank
        if not self.tp.distributed:
            return local
        full = self.tp.gather_columns(local)  # rank 0: (S, tp * V/tp)
        if full is None:
            return local[:, :0]
        return full[:, : self.config.vocab_size]


@dataclass(slots=True)
class _LayerLinears:
    """One layer's projections as callables (engine.linear). With a packed backend (the C kernel or
    oneDNN), q/k/v are one matmul over the concatenated weights and so are gate/up: a decode step
    then streams each layer's weights in 4 calls instead of 7 (with oneDNN: 12.1 ms against 15.8 ms
    for the bench model's 8 layers at 16 rows), and every output element is the same dot product as
    before, bit for bit (checked in tests). The torch reference keeps transformers' separate
    F.linear calls."""

    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    o: Linear
    gate_up: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    down: Linear
    # the linears themselves, (q/k/v parts, o, gate/up parts, down), for engine.kernels.cpu_decode
    kernels: tuple[tuple[Linear, ...], Linear, tuple[Linear, ...], Linear] | None = None

    @classmethod
    def build(cls, w: LayerWeights, backend: str) -> _LayerLinears:
        o, down = make_linear(w.o_proj, w.o_bias, backend), make_linear(w.down_proj, None, backend)
        if backend == "torch":
            q, k, v = (make_linear(wt, b, backend) for wt, b in _qkv(w))
            gate, up = make_linear(w.gate_proj, None, backend), make_linear(w.up_proj, None, backend)
            return cls(lambda x: (q(x), k(x), v(x)), o, lambda x: (gate(x), up(x)), down)
        parts = _qkv(w)
        sizes = [wt.shape[0] for wt, _ in parts]
        fused_qkv, fused_gate_up = cat_rows([wt for wt, _ in parts]), cat_rows([w.gate_proj, w.up_proj])
        if fused_qkv is None or fused_gate_up is None:  # quantized parts of different formats
            q, k, v = (make_linear(wt, b, backend) for wt, b in parts)
            gate, up = make_linear(w.gate_proj, None, backend), make_linear(w.up_proj, None, backend)
            kernels = ((q, k, v), o, (gate, up), down)
            return cls(lambda x: (q(x), k(x), v(x)), o, lambda x: (gate(x), up(x)), down, kernels)
        bias = None
        if any(b is not None for _, b in parts):
            bias = torch.cat(
                [b if b is not None else torch.zeros(n) for (_, b), n in zip(parts, sizes, strict=True)]
            )
        qkv = make_linear(fused_qkv, bias, backend)
        inter = w.gate_proj.shape[0]
        gate_up = make_linear(fused_gate_up, None, backend)

        def split_qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            q, k, v = qkv(x).split(sizes, dim=-1)
            return q, k, v

        def split_gate_up(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = gate_up(x)
            return y[:, :inter], y[:, inter:]

        return cls(split_qkv, o, split_gate_up, down, ((qkv,), o, (gate_up,), down))


def _qkv(w: LayerWeights) -> list[tuple[Weight, torch.Tensor | None]]:
    return [(w.q_proj, w.q_bias), (w.k_proj, w.k_bias), (w.v_proj, w.v_bias)]


def load_model(
    path: str | Path,
    dtype: str = "float32",
    attn_backend: str = "auto",
    device: str = "cpu",
    linear_backend: str = "auto",
    tp: TPGroup | None = None,
    quantized_weights: str = "auto",
    kv_cache_dtype: str = "auto",
) -> Model:
    """Parse the config, map the weights (this rank's shard of them, with ``tp``) and build the model
    (no KV cache: the caller allocates it with ``model.kv_layout(block_size).allocate(num_blocks)``).
    ``quantized_weights``: ``auto`` | ``native`` | ``dequantize`` (engine/quant/method.py)."""
    config = ModelConfig.from_pretrained(path, dtype=dtype)
    run_dtype, dev = torch_dtype(dtype), torch.device(device)
    mode = resolve_mode(quantized_weights, resolve(linear_backend, run_dtype, dev), run_dtype, dev)
    weights = load_weights(path, config, device=device, native=mode == "native")
    if tp is not None and tp.size > 1:
        # a shard's row-parallel weights are column slices, which cut quantized blocks: dense first
        weights = _dense(weights, run_dtype)
        weights = shard_weights(weights, config, tp.rank, tp.size)
    return Model(config, weights, attn_backend, device, linear_backend, tp, kv_cache_dtype)


def _dense(weights: ModelWeights, dtype: torch.dtype) -> ModelWeights:
    """``weights`` with every quantized one dequantized (the reference floats, in ``dtype``)."""

    def d(w: Weight) -> Weight:
        return dense(w, dtype) if is_quantized(w) else w

    layers = tuple(
        LayerWeights(
            input_norm=lw.input_norm,
            q_proj=d(lw.q_proj),
            k_proj=d(lw.k_proj),
            v_proj=d(lw.v_proj),
            q_bias=lw.q_bias,
            k_bias=lw.k_bias,
            v_bias=lw.v_bias,
            o_proj=d(lw.o_proj),
            o_bias=lw.o_bias,
            post_norm=lw.post_norm,
            gate_proj=d(lw.gate_proj),
            up_proj=d(lw.up_proj),
            down_proj=d(lw.down_proj),
        )
        for lw in weights.layers
    )
    embed = d(weights.embed)
    lm_head = embed if weights.lm_head is weights.embed else d(weights.lm_head)
    return ModelWeights(embed=embed, layers=layers, norm=weights.norm, lm_head=lm_head)
