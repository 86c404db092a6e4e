"""The forward pass over a flat batch and the paged KV cache: a stack of blocks (engine/blocks.py)
whose attention (per-head, or latent: engine/mla.py) and MLP (dense, or experts: engine/moe.py) the
checkpoint chooses.

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
from typing import Any

import torch

from engine.attention import AttentionBackend, AttentionMetadata, as_decode_queries
from engine.attention_backends import get_backend
from engine.blocks import Block, HeadAttention, StepState, dense_mlp
from engine.config import ModelConfig
from engine.expert_parallel import ExpertDispatch
from engine.kernels.cpu_decode import DecodePlan
from engine.kernels.cpu_fused import FusedCpuOps, LayerOps, TorchLayerOps
from engine.kv_layout import KVLayout, torch_dtype
from engine.kv_quant import QuantizedKVAttention
from engine.linear import Linear, make_linear, resolve
from engine.mla import LatentAttention
from engine.moe import MoEMLP
from engine.moe_backends import experts_for
from engine.parallel import ShardInfo, TPGroup, shard_info, shard_weights
from engine.quant.method import cat_rows, embedding, resolve_mode
from engine.quant.weight import Weight, dense, is_quantized
from engine.rope import RotaryTables, softmax_scale
from engine.tp_layout import Parallelism
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
        moe_backend: str = "auto",
        parallel: Parallelism | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        """``weights`` are already this rank's shard when ``tp`` has more than one rank.
        ``moe_backend``: the experts' (engine/moe_backends.py). ``parallel``: what the ranks of
        ``tp`` split (engine/tp_layout.py; default: everything tensor parallel).
        ``kv_cache_dtype``: auto (the run dtype) | fp8_e4m3 | int8 (engine/kv_quant.py)."""
        self.config = config
        self.weights = weights
        self.device = torch.device(device)
        self.tp = tp or TPGroup.single(self.device)
        self.parallel = parallel or Parallelism(self.tp.size, self.tp.size, 1)
        if self.parallel.world != self.tp.size:
            raise ValueError(f"{self.parallel} over a group of {self.tp.size} ranks")
        attn_rank = self.tp.rank if self.parallel.tp > 1 else 0
        self.shard: ShardInfo = shard_info(config, attn_rank, self.parallel.tp, self.parallel.ep)
        self.dtype = torch_dtype(config.dtype)
        self.attn: AttentionBackend = get_backend(attn_backend, device)
        self.kv_dtype = KVLayout(1, 1, 1, 1, kv_dtype=kv_cache_dtype).kv_dtype  # validated
        if self.kv_dtype != "auto":  # rows quantized as written, dequantized per block as read
            if config.mla is not None:
                raise ValueError("kv_cache_dtype: a quantized KV cache is not built for MLA's latent cache")
            decode_kernel = bool(getattr(self.attn, "kernel", False))
            self.attn = QuantizedKVAttention(self.attn, self.kv_dtype, decode_kernel)
        self.rope = RotaryTables.build(config, self.dtype, self.device)  # cached once per model
        self.scale = softmax_scale(config)
        self.linear_backend = resolve(linear_backend, self.dtype, self.device)
        self.moe_backend = moe_backend
        # per layer, for the one-C-call plan: its linears (q/k/v parts, o, gate/up parts, down) when
        # it is a plain dense per-head layer, else None
        self.layer_kernels: list[Any] = []
        self.blocks = [self._block(w) for w in weights.layers]
        self.lm_head = make_linear(weights.lm_head, None, self.linear_backend)
        # the residual add + RMSNorm and rope + KV write: fused C with the CPU attention kernel (fp32),
        # transformers' torch expressions otherwise; both give the same floats
        self.ops: LayerOps = TorchLayerOps(self.rope, self.attn, config.head_dim)
        if getattr(self.attn, "kernel", False) and self.dtype == torch.float32 and self.device.type == "cpu":
            self.ops = FusedCpuOps.create(self.rope, config.head_dim) or self.ops
        # one rank, every layer plain, all C kernels: a step is one C call per layer (cpu_decode.py)
        self.decode_plan: DecodePlan | None = None
        if not self.tp.distributed and all(k is not None for k in self.layer_kernels):
            self.decode_plan = DecodePlan.create(
                self.layer_kernels,
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

    def _block(self, w: LayerWeights) -> Block:
        """One layer's attention and MLP parts, as its weights say (engine/blocks.py)."""
        c, backend, par = self.config, self.linear_backend, self.parallel
        reduce = self.tp.all_reduce if par.tp > 1 else _whole  # replicated: nothing to sum
        if w.mla is not None:
            assert c.mla is not None
            attn: Any = LatentAttention(
                w.mla, c.mla, self.shard.num_heads, c.rms_norm_eps, self.scale, self.rope, backend, reduce
            )
        else:
            qkv, o, qkv_kernels = _attention_linears(w, backend)
            qk_norm = None if w.q_norm is None or w.k_norm is None else (w.q_norm, w.k_norm, c.rms_norm_eps)
            attn = HeadAttention(qkv, o, self.attn, c.head_dim, self.scale, reduce, qk_norm)
        if w.moe is not None:
            assert c.moe is not None
            experts = experts_for(self.moe_backend, w.moe, backend, self.dtype, self.device)
            if par.ep > 1:  # whole experts on their ranks: the output comes back whole
                dispatch = ExpertDispatch(self.tp, c.moe.num_experts)
                mlp: Callable[[torch.Tensor], torch.Tensor] = MoEMLP(
                    w.moe, c.moe, backend, experts, _whole, dispatch
                )
            else:
                mlp = MoEMLP(w.moe, c.moe, backend, experts, reduce)
        else:
            gate_up, down, gate_up_kernels = _mlp_linears(w, backend)
            mlp = dense_mlp(gate_up, down, reduce)
        plain = w.mla is None and w.moe is None and w.q_norm is None and qkv_kernels and gate_up_kernels
        self.layer_kernels.append((qkv_kernels, o, gate_up_kernels, down) if plain else None)
        return Block(w.input_norm, w.post_norm, attn, mlp)

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
        """input_ids, positions (T,) int64; kv_cache (L, N, planes, H_kv, B, D). Writes this step's K/V at
        ``meta.slot_mapping`` in every layer; returns the final-norm hidden states (T, hidden).

        ``on_layer(i)`` (optional) runs as soon as layer ``i``'s K/V are in ``kv_cache``, so a prefill
        worker can ship that layer while the next ones are computed."""
        c, ops = self.config, self.ops
        x = embedding(self.weights.embed, input_ids, self.dtype)  # (T, hidden), a fresh tensor
        if self.decode_plan is not None and input_ids.shape[0]:
            # every token as a decode query (prefill chunks too: attention.as_decode_queries), the
            # same kernels called from C, one call per layer
            return self.decode_plan.forward(x, positions, kv_cache, as_decode_queries(meta), on_layer)
        num_slots = kv_cache.shape[1] * kv_cache.shape[4]  # N * B
        step = StepState(
            positions, meta.slot_mapping, ops.prepare(positions, meta.slot_mapping, num_slots), ops
        )
        delta: torch.Tensor | None = None  # the previous layer's MLP output, not yet added to x
        for i, block in enumerate(self.blocks):
            x, h = ops.add_rms_norm(x, delta, block.input_norm, c.rms_norm_eps)  # (T, hidden) each
            q = block.attn.write(h, step, kv_cache[i])  # this step's KV is in the cache now
            if on_layer is not None:
                on_layer(i)
            attn_out = block.attn.attend(q, kv_cache[i], meta)  # (T, hidden), summed over ranks
            x, h = ops.add_rms_norm(x, attn_out, block.post_norm, c.rms_norm_eps)
            delta = block.mlp(h)  # (T, hidden)
        return ops.add_rms_norm(x, delta, self.weights.norm, c.rms_norm_eps)[1]  # (T, hidden)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(S, hidden) -> (S, vocab) fp32. With tensor parallelism every rank calls it (the
        vocabulary pieces are gathered): rank 0 gets the logits, the others an empty (S, 0)."""
        if self.parallel.tp == 1 and self.tp.rank > 0:  # a replicated LM head: rank 0 alone needs it
            return hidden.new_empty(hidden.shape[0], 0, dtype=torch.float32)
        local = self.lm_head(hidden).float()  # (S, V/tp), padded on the last rank
        if self.parallel.tp == 1:
            return local
        full = self.tp.gather_columns(local)  # rank 0: (S, tp * V/tp)
        if full is None:
            return local[:, :0]
        return full[:, : self.config.vocab_size]


@dataclass(slots=True)
class _LayerLinears:
    """A dense per-head layer's projections as callables: the four matmul calls of a layer
    (``tandem bench kernels`` times them per backend)."""

    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    o: Linear
    gate_up: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    down: Linear

    @classmethod
    def build(cls, w: LayerWeights, backend: str) -> _LayerLinears:
        qkv, o, _ = _attention_linears(w, backend)
        gate_up, down, _ = _mlp_linears(w, backend)
        return cls(qkv, o, gate_up, down)


def _attention_linears(
    w: LayerWeights, backend: str
) -> tuple[
    Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]], Linear, tuple[Linear, ...]
]:
    """A per-head layer's q/k/v and o projections as callables (engine.linear). With a packed backend
    (the C kernel or oneDNN), q/k/v are one matmul over the concatenated weights (and so are gate/up,
    ``_mlp_linears``): a decode step then streams each layer's weights in 4 calls instead of 7 (with
    oneDNN: 12.1 ms against 15.8 ms for the bench model's 8 layers at 16 rows), and every output
    element is the same dot product as before, bit for bit (checked in tests). The torch reference
    keeps transformers' separate F.linear calls. Quantized weights fuse when their formats agree
    (``cat_rows``), else stay three linears. Also returns the linears themselves, for the C plan."""
    assert w.o_proj is not None
    o = make_linear(w.o_proj, w.o_bias, backend)
    parts = _qkv(w)
    fused = None if backend == "torch" else cat_rows([wt for wt, _ in parts])
    if fused is None:  # the torch reference, or quantized parts of different formats
        q, k, v = (make_linear(wt, b, backend) for wt, b in parts)
        return (lambda x: (q(x), k(x), v(x))), o, (q, k, v)
    sizes = [wt.shape[0] for wt, _ in parts]
    bias = None
    if any(b is not None for _, b in parts):
        bias = torch.cat(
            [b if b is not None else torch.zeros(n) for (_, b), n in zip(parts, sizes, strict=True)]
        )
    qkv = make_linear(fused, bias, backend)

    def split_qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv(x).split(sizes, dim=-1)
        return q, k, v

    return split_qkv, o, (qkv,)


def _mlp_linears(
    w: LayerWeights, backend: str
) -> tuple[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], Linear, tuple[Linear, ...]]:
    """A dense layer's gate/up (one matmul on a packed backend) and down projections, and the
    linears themselves (for the C plan)."""
    assert w.gate_proj is not None and w.up_proj is not None and w.down_proj is not None
    down = make_linear(w.down_proj, None, backend)
    fused = None if backend == "torch" else cat_rows([w.gate_proj, w.up_proj])
    if fused is None:
        gate, up = make_linear(w.gate_proj, None, backend), make_linear(w.up_proj, None, backend)
        return (lambda x: (gate(x), up(x))), down, (gate, up)
    inter = w.gate_proj.shape[0]
    gate_up = make_linear(fused, None, backend)

    def split_gate_up(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = gate_up(x)
        return y[:, :inter], y[:, inter:]

    return split_gate_up, down, (gate_up,)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The all-reduce of a part that every rank computes whole (replicated): nothing to sum."""
    return t


def _qkv(w: LayerWeights) -> list[tuple[Weight, torch.Tensor | None]]:
    assert w.q_proj is not None and w.k_proj is not None and w.v_proj is not None
    return [(w.q_proj, w.q_bias), (w.k_proj, w.k_bias), (w.v_proj, w.v_bias)]


def load_model(
    path: str | Path,
    dtype: str = "float32",
    attn_backend: str = "auto",
    device: str = "cpu",
    linear_backend: str = "auto",
    tp: TPGroup | None = None,
    moe_backend: str = "auto",
    parallel: Parallelism | None = None,
    quantized_weights: str = "auto",
    kv_cache_dtype: str = "auto",
) -> Model:
    """Parse the config, map the weights (this rank's shard of them, with ``tp``: split as
    ``parallel`` says, by default all tensor parallel) and build the model (no KV cache: the caller
    allocates it with ``model.kv_layout(block_size).allocate(num_blocks)``).
    ``quantized_weights``: ``auto`` | ``native`` | ``dequantize`` (engine/quant/method.py)."""
    config = ModelConfig.from_pretrained(path, dtype=dtype)
    run_dtype, dev = torch_dtype(dtype), torch.device(device)
    mode = resolve_mode(quantized_weights, resolve(linear_backend, run_dtype, dev), run_dtype, dev)
    weights = load_weights(path, config, device=device, native=mode == "native")
    if tp is not None and tp.size > 1:
        # a shard's row-parallel weights are column slices, which cut quantized blocks: dense first
        weights = _dense(weights, run_dtype)
        par = parallel or Parallelism(tp.size, tp.size, 1)
        weights = shard_weights(weights, config, tp.rank, par.tp, par.ep)
    return Model(
        config, weights, attn_backend, device, linear_backend, tp, moe_backend, parallel, kv_cache_dtype
    )


def _dense(weights: ModelWeights, dtype: torch.dtype) -> ModelWeights:
    """``weights`` with every quantized one dequantized (the reference floats, in ``dtype``)."""

    def d(w: Any) -> Any:
        return dense(w, dtype) if w is not None and is_quantized(w) else w

    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    layers = tuple(
        dataclasses.replace(lw, **{n: d(getattr(lw, n)) for n in names})  # type: ignore[arg-type]
        for lw in weights.layers
    )
    embed = d(weights.embed)
    lm_head = embed if weights.lm_head is weights.embed else d(weights.lm_head)
    return ModelWeights(embed=embed, layers=layers, norm=weights.norm, lm_head=lm_head)
