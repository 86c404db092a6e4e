"""Everything a deployment runs, derived once from its TandemConfig: one function per level.

::

    TandemConfig (deploy/config.py, the YAML)
      ├─ model_dir(cfg)                      the checkpoint ("demo": generated on first use)
      ├─ check_model(cfg, model)             the pools' tensor_parallel_size against its heads
      ├─ engine_config(cfg, device)          EngineConfig: model, dtype, engine knobs, G1 = tiers.g1
      ├─ tier_config(cfg)                    TierConfig: G2 = tiers.g2, G3 = tiers.g3 under tiers.dir
      ├─ worker_config(cfg, pool, id)        WorkerConfig: the two above + this worker's transport
      ├─ pool_spec(pool)                     PoolSpec: replicas, Ray resources, node labels
      ├─ worker_telemetry(cfg)               TelemetryConfig: the router's exporter, for the workers
      ├─ server_options(cfg.router)          router.server.TandemServer's keyword arguments (gRPC,
      │                                      http_options: the OpenAI HTTP front door,
      │                                      security_options: keys, TLS, rate limit; request limits)
      └─ redis_options(cfg.metadata)         redis-py's password / ssl_* keywords for the store

``tandem serve`` (both backends), ``tandem launch`` and the launched router call these and nothing
else turns a TandemConfig into a lower-level config, so a YAML key means the same on every path.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from deploy.config import (
    ConfigError,
    MetadataConfig,
    PoolConfig,
    RouterConfig,
    TandemConfig,
    check_expert_parallel_sizes,
    check_tensor_parallel_sizes,
)
from engine.llm_engine import EngineConfig
from memory_tiers.tier_store import TierConfig
from pool_runtime.actors import PoolSpec
from pool_runtime.config import WorkerConfig
from pool_runtime.tracing import TelemetryConfig
from router.http.options import HttpOptions
from router.security import RateLimit, SecurityOptions, TlsFiles
from router.validation import RequestLimits

# Every worker of a deployment moves KV over NIXL (UCX; shared memory or TCP on a CPU box).
KV_BACKEND = "nixl"


def model_dir(cfg: TandemConfig) -> Path:
    """The checkpoint ``cfg.model`` names (engine/model_source.py): an alias's (SmolLM2 fetched, the
    demo made, on first use), a checkpoint directory or a GGUF file."""
    from engine.model_source import resolve_model

    return resolve_model(cfg.model)


def model_name(cfg: TandemConfig) -> str:
    """What GetModelInfo calls the model: the alias, or the path's last part."""
    from engine.model_source import model_name as name_of

    return name_of(cfg.model)


def check_model(cfg: TandemConfig, model: Path) -> None:
    """Raise ConfigError, naming the key, when the checkpoint at ``model`` asks for something the
    engine does not run (an architecture, a routing option: engine/config.py), or a pool's
    ``tensor_parallel_size`` / ``expert_parallel_size`` cannot split it; one that cannot be read
    here (``tandem launch`` from a machine without it) is left to the workers, which check again as
    they load."""
    from engine.config import ModelConfig

    try:
        mc = ModelConfig.from_pretrained(model, cfg.dtype)
    except (OSError, KeyError):  # absent or unreadable here: the workers will say
        return
    except ValueError as e:  # read, and refused (engine.arch.CheckpointError): it names the file and key
        raise ConfigError(str(e)) from None
    dense = mc.moe is None or len(mc.moe.sparse_layers) < mc.num_layers
    check_tensor_parallel_sizes(
        cfg, mc.num_heads, mc.num_kv_heads, mc.intermediate_size if dense else None, str(model)
    )
    moe = mc.moe
    widths = (moe.intermediate_size, moe.shared_intermediate_size) if moe else ()
    check_expert_parallel_sizes(cfg, moe.num_experts if moe else 0, widths, str(model))


def engine_config(cfg: TandemConfig, device: str = "cpu", model: Path | None = None) -> EngineConfig:
    """The engine every worker (or the one in-process engine) runs; G1 is ``tiers.g1``."""
    e = cfg.engine
    return EngineConfig(
        model=model if model is not None else model_dir(cfg),
        dtype=cfg.dtype,
        attn_backend=e.attn_backend,
        quantized_weights=e.quantized_weights,
        kv_cache_dtype=cfg.pools.decode.kv_cache_dtype,  # the one engine decodes; a worker: its pool
        device=device,
        block_size=e.block_size,
        kv_cache_bytes=int(cfg.tiers.g1.capacity),
        max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens,
        max_model_len=e.max_model_len,
        enable_prefix_caching=e.enable_prefix_caching,
        max_step_time_s=e.max_step_time_ms / 1e3 if e.max_step_time_ms is not None else None,
        min_prefill_tokens=e.min_prefill_tokens,
    )


def tier_config(cfg: TandemConfig) -> TierConfig | None:
    """G2 (and G3, unless ``tiers.g3`` is null) below each worker's G1; each worker's G3 files go
    under ``<tiers.dir>/<worker id>`` (pool_runtime/build.py)."""
    t = cfg.tiers
    g3 = t.g3
    return TierConfig(
        host_bytes=int(t.g2.capacity),
        disk_dir=str(t.resolved_dir) if g3 is not None else None,
        disk_bytes=int(g3.capacity) if g3 is not None else 0,
    )


def worker_config(
    cfg: TandemConfig, pool: PoolConfig, worker_id: str, model: Path | None = None
) -> WorkerConfig:
    """What worker ``worker_id`` of ``pool`` runs (on CUDA when the pool asks for GPUs). A
    tensor-parallel worker runs G1 only: ``tiers.g2`` / ``g3`` are not built for it (each rank
    would have to offload and onboard its heads in lockstep); ``tiers.g1`` is per rank."""
    tp, ep = pool.tensor_parallel_size, pool.expert_parallel_size
    engine = engine_config(cfg, pool.device, model)
    engine.tensor_parallel_size, engine.expert_parallel_size = tp, ep  # engine/tp_layout.Parallelism
    return WorkerConfig(
        dataclasses.replace(engine, kv_cache_dtype=pool.kv_cache_dtype),
        worker_id=worker_id,
        tiers=tier_config(cfg) if pool.ranks == 1 else None,
        kv_backend=KV_BACKEND,
        tensor_parallel_size=tp,
        torch_threads=pool.threads or 0,
        expert_parallel_size=ep,
    )


def pool_spec(pool: PoolConfig, max_restarts: int = -1) -> PoolSpec:
    """The pool's Ray placement (-1: Ray restarts a dead worker forever)."""
    return PoolSpec(
        pool.replicas,
        pool.num_cpus,
        pool.num_gpus,
        dict(pool.resources),
        dict(pool.node_labels),
        max_restarts,
    )


def worker_telemetry(cfg: TandemConfig) -> TelemetryConfig:
    """What the workers of a deployment trace with: the router's exporter (``router.tracing``)."""
    t = cfg.router.tracing
    return TelemetryConfig(t.exporter, t.otlp_endpoint)


def server_options(
    rc: RouterConfig,
    routing_policy: str | None = None,
    model_root: str = "",
    metadata: MetadataConfig | None = None,
) -> dict[str, Any]:
    """``TandemServer(backend, telemetry=..., **server_options(rc))``: the gRPC server and the HTTP
    front door beside it (``router.http``; None when disabled) a ``router`` section describes;
    ``routing_policy`` overrides ``rc.policy`` (what GetServerInfo reports); ``model_root`` is what
    /v1/models reports as the model's source; a Redis ``metadata`` store holds the rate limits."""
    lim = rc.limits
    return dict(
        security=security_options(rc, metadata),
        # the same fields by name (derived, not copied one by one); the message size is the server's
        limits=RequestLimits(**lim.model_dump(exclude={"max_message_bytes"})),
        max_message_bytes=int(lim.max_message_bytes),
        host=rc.host,
        port=rc.port,
        max_concurrency=rc.max_concurrency,
        max_queue=rc.max_queue,
        default_disaggregation=rc.disaggregation,
        routing_policy=routing_policy or rc.policy,
        http=http_options(rc, model_root),
    )


def security_options(rc: RouterConfig, metadata: MetadataConfig | None = None) -> SecurityOptions:
    """``router.security`` as router/security.py's options; the rate limit's buckets live in the
    metadata store's Redis when there is one."""
    sec = rc.security
    tls = sec.tls
    rate = sec.rate_limit
    redis = metadata is not None and metadata.is_redis and rate is not None
    return SecurityOptions(
        api_keys_file=str(sec.api_keys_file) if sec.api_keys_file else None,
        api_keys_env=sec.api_keys_env,
        tls=TlsFiles(
            str(tls.cert_file), str(tls.key_file), str(tls.client_ca_file) if tls.client_ca_file else None
        )
        if tls is not None
        else None,
        allow_unauthenticated_health=sec.allow_unauthenticated_health,
        rate_limit=RateLimit(rate.requests_per_s, rate.burst) if rate is not None else None,
        redis_url=metadata.store if redis and metadata is not None else None,
        redis_kwargs=redis_options(metadata) if redis and metadata is not None else {},
    )


def check_security(cfg: TandemConfig) -> None:
    """Raise ConfigError, naming the field, unless the API keys load, the TLS files read and the
    Redis password is set (what the router will need when it starts)."""
    from router.security import KeyStore

    opts = security_options(cfg.router, cfg.metadata)
    try:
        KeyStore.load(opts.api_keys_file, opts.api_keys_env)
    except ValueError as e:
        raise ConfigError(f"router.security.{e}") from None
    if opts.tls is not None:
        try:
            opts.tls.read()
        except OSError as e:
            raise ConfigError(f"router.security.tls: cannot read {e.filename} ({e.strerror})") from None
    if cfg.metadata.is_redis:
        redis_options(cfg.metadata)


def redis_options(md: MetadataConfig) -> dict[str, Any]:
    """redis-py's keywords for the store beyond its URL: the password (read from ``password_env``
    now; unset is an error) and the TLS files of a rediss:// store."""
    out: dict[str, Any] = {}
    if md.password_env:
        password = os.environ.get(md.password_env)
        if not password:
            raise ConfigError(f"metadata.password_env: the environment variable {md.password_env} is unset")
        out["password"] = password
    if md.tls is not None:
        if md.tls.ca_file is not None:
            out["ssl_ca_certs"] = str(md.tls.ca_file)
        if md.tls.cert_file is not None and md.tls.key_file is not None:
            out["ssl_certfile"], out["ssl_keyfile"] = str(md.tls.cert_file), str(md.tls.key_file)
    return out


def http_options(rc: RouterConfig, model_root: str = "") -> HttpOptions | None:
    """The HTTP front door of ``rc`` (router.http.app.HttpOptions), None when ``http.enabled`` is off."""
    h = rc.http
    if not h.enabled:
        return None
    return HttpOptions(h.host or rc.host, h.port, int(h.max_request_bytes), model_root)
