"""What a model costs per rank of a worker: weights by part, as engine/parallel.py and
engine/expert_parallel.py split them, and KV bytes per token, as the paged pool holds them. The
memory arithmetic written beside a deployment example comes from here, not from a hand calculator
(``python -m deploy.memory EXAMPLE.yaml CONFIG.json ...`` prints it; a test checks it is current).

Per rank of a worker split ``tp`` ways (attention heads, dense MLP columns, LM head rows) and ``ep``
ways (routed experts)::

    embedding             V x h                     every rank (a lookup: replicated)
    LM head               ceil(V / tp) x h          vocab-parallel (0 extra when tied)
    attention, per-head   (H + 2 H_kv) D h / tp + H D h / tp
    attention, MLA        q_a + kv_a (every rank) + (q_b + kv_b + o) / tp
    dense MLP             3 h I / tp
    MoE layer             router E h  +  routed (E / ep) 3 h I_e (/ tp when ep == 1)
                          + shared 3 h I_s (/ tp when ep == 1: with EP it is whole on every rank)

KV per token is the cache's, every layer: 2 H_kv D (per-head; H_kv / tp per rank), or MLA's latent
``kv_lora_rank + qk_rope_head_dim``, whole on every rank (the latent is shared by all heads).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.config import ModelConfig
from engine.tp_layout import Parallelism

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class RankMemory:
    """Parameters held by one rank, by part, and the KV bytes per token of its pool."""

    params: dict[str, int]
    kv_bytes_per_token: int

    @property
    def total(self) -> int:
        return sum(self.params.values())


def rank_memory(mc: ModelConfig, par: Parallelism, kv_dtype_bytes: int = 2) -> RankMemory:
    h, v, tp, ep = mc.hidden_size, mc.vocab_size, par.tp, par.ep
    attn = 0
    if mc.mla is not None:
        m, n = mc.mla, mc.num_heads
        qk = m.qk_head_dim
        q = (m.q_lora_rank * h + m.q_lora_rank * n * qk // tp) if m.q_lora_rank else n * qk * h // tp
        kv = m.latent_dim * h + m.kv_lora_rank * n * (m.qk_nope_head_dim + m.v_head_dim) // tp
        attn = q + kv + h * n * m.v_head_dim // tp + m.kv_lora_rank + (m.q_lora_rank or 0)
        kv_token = mc.num_layers * m.latent_dim * kv_dtype_bytes
    else:
        d, kv_heads = mc.head_dim, max(1, mc.num_kv_heads // tp)
        attn = 2 * mc.num_heads * d * h // tp + 2 * kv_heads * d * h
        kv_token = mc.num_layers * 2 * kv_heads * d * kv_dtype_bytes
    moe = mc.moe
    sparse = len(moe.sparse_layers) if moe else 0
    dense = mc.num_layers - sparse
    split = tp if ep == 1 else 1  # experts' columns split by TP only when EP does not split them
    params = {
        "embedding": v * h,
        "LM head": 0 if mc.tie_word_embeddings else -(-v // tp) * h,
        "attention": mc.num_layers * attn,
        "norms": mc.num_layers * 2 * h + h,
        "dense MLPs": dense * 3 * h * mc.intermediate_size // tp,
    }
    if moe is not None:
        params["routers"] = sparse * moe.num_experts * (h + (1 if moe.score_correction_bias else 0))
        params["routed experts"] = sparse * (moe.num_experts // ep) * 3 * h * moe.intermediate_size // split
        params["shared experts"] = sparse * 3 * h * moe.shared_intermediate_size // split
    return RankMemory(params, kv_token)


def active_params(mc: ModelConfig) -> int:
    """Parameters one token's forward reads (all of them but the experts it was not routed to)."""
    whole = rank_memory(mc, Parallelism())
    if mc.moe is None:
        return whole.total
    routed = whole.params["routed experts"]
    return whole.total - routed + routed * mc.moe.top_k // mc.moe.num_experts


def render(title: str, mc: ModelConfig, pools: dict[str, tuple[Parallelism, float]], dtype_bytes: int) -> str:
    """A markdown section: the model's size, and per pool (its split, its GPUs' HBM in GiB) one
    rank's weights, KV per token and the tokens of KV that fit in what is left of its HBM."""
    whole = rank_memory(mc, Parallelism())
    hbm = ", ".join(f"{name} {gib:g} GiB" for name, (_, gib) in pools.items())
    lines = [
        f"### {title}",
        "",
        f"{whole.total / 1e9:.2f} B parameters, {active_params(mc) / 1e9:.2f} B active per token; "
        f"{dtype_bytes} byte(s) per weight and per KV value; HBM per GPU: {hbm}.",
        "",
        "| per rank | "
        + " | ".join(f"{name} (tp {p.tp}, ep {p.ep})" for name, (p, _) in pools.items())
        + " |",
        "|---|" + "---|" * len(pools),
    ]
    ranks = {name: rank_memory(mc, p, dtype_bytes) for name, (p, _) in pools.items()}
    for part in whole.params:
        row = [f"{r.params[part] * dtype_bytes / GIB:.2f} GiB" for r in ranks.values()]
        lines.append(f"| {part} | " + " | ".join(row) + " |")
    lines.append(
        "| **weights** | "
        + " | ".join(f"**{r.total * dtype_bytes / GIB:.2f} GiB**" for r in ranks.values())
        + " |"
    )
    lines.append(
        "| KV per token (all layers) | "
        + " | ".join(f"{r.kv_bytes_per_token:,} B" for r in ranks.values())
        + " |"
    )
    fits = []
    for r, (_, gib) in zip(ranks.values(), pools.values(), strict=True):
        free = gib * GIB * 0.9 - r.total * dtype_bytes  # 10% for activations and the runtime
        fits.append(f"{max(0, int(free // r.kv_bytes_per_token)):,}" if free > 0 else "does not fit")
    lines.append("| tokens of KV in 90% of HBM | " + " | ".join(fits) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("deployment", help="the deployment YAML (its pools' tensor/expert parallel sizes)")
    p.add_argument(
        "configs",
        nargs="+",
        help="TITLE=CONFIG.json:BYTES:PREFILL_GIB/DECODE_GIB (bytes per weight, HBM per GPU)",
    )
    args = p.parse_args(argv)
    sys.stdout.write(markdown(args.deployment, args.configs))
    return 0


def markdown(deployment: str | Path, sections: list[str]) -> str:
    """The sections ``main`` prints, for a deployment YAML and ``TITLE=CONFIG.json:BYTES:P/D`` specs."""
    from deploy.config import load_config

    cfg = load_config(deployment)
    out = []
    for item in sections:
        title, _, spec = item.partition("=")
        path, nbytes, hbm = spec.split(":")
        gib = [float(g) for g in hbm.split("/")]
        pools = {
            role: (Parallelism.of(pool.tensor_parallel_size, pool.expert_parallel_size), gib[i % len(gib)])
            for i, (role, pool) in enumerate((("prefill", cfg.pools.prefill), ("decode", cfg.pools.decode)))
        }
        mc = ModelConfig.from_dict(json.loads(Path(path).read_text()), dtype="bfloat16")
        out.append(render(title, mc, pools, int(nbytes)))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
