"""Tandem's deployment configuration: the pydantic schema of the YAML, its loader and the default.

One file describes a whole deployment, from the embedded one-machine default (``deploy/local.yaml``
is :func:`default_config` written out) to a multi-node Ray cluster (``deploy/examples/``)::

    model / dtype / engine   what runs, and the engine knobs every worker shares
    pools.prefill|decode     replicas, Ray resources per worker, node labels that pin them
    tiers                    G1 device / G2 host / G3 disk capacities, G3's directory
    topology                 node -> NVLink domain / rack, link bandwidths, kv-bench calibration
    metadata                 "memory" (in the router) or a redis:// URL (several routers, restarts),
                             its password (from an environment variable) and TLS files
    router                   address, policy, disaggregation, admission limits, tracing, its
                             OpenAI-compatible HTTP front door (router.http), security (API keys,
                             TLS / mTLS, rate limits: router.security) and request limits (router.limits)
    ray                      the cluster `tandem launch` joins, the namespace of its named actors

Unknown keys are errors (a typo must not silently fall back to a default), and every error names
the field by its dotted path: ``pools.decode.replicas: Input should be greater than or equal to 1``.
Pure: imports no ray, torch or grpc, so the CLI can validate a file without starting anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from router.topology import parse_link_class

LOCAL_YAML = Path(__file__).resolve().parent / "local.yaml"

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class ConfigError(ValueError):
    """A configuration file cannot be used; the message names the file and each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineSection(_Strict):
    """Engine settings every worker shares (``engine.llm_engine.EngineConfig``)."""

    block_size: int = Field(default=16, ge=1, le=1024)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=512, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)  # None: the checkpoint's max_position_embeddings
    attn_backend: Literal["auto", "torch", "cpu", "triton"] = "auto"
    quantized_weights: Literal["auto", "native", "dequantize"] = "auto"  # engine/quant/method.py
    enable_prefix_caching: bool = True
    # A bounded iteration: each step's predicted time (measured step costs) stays within this, the
    # prefill chunks shrinking to fit beside the running decodes; None: the token budget alone.
    max_step_time_ms: float | None = Field(default=None, gt=0)
    min_prefill_tokens: int = Field(default=16, ge=1)  # a step's first prefill chunk gets at least this


class PoolConfig(_Strict):
    """One pool's workers: how many, and the Ray resources / node labels each one asks for.

    ``tensor_parallel_size`` > 1 splits each worker's model over that many processes (one per
    device) on one node: ``num_cpus`` / ``num_gpus`` / ``resources`` are then per rank. It must
    split the model's heads (checked against the checkpoint: deploy/derive.py ``check_model``).
    ``expert_parallel_size`` > 1 splits each MoE layer's routed experts over that many ranks (tokens
    travel to their experts' ranks and back, all-to-all); a worker is max(tp, ep) ranks, and each of
    the two is 1 or that number (ep > 1 with tp 1: attention replicated on every rank)."""

    replicas: int = Field(default=1, ge=0)
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    # what this pool's KV cache holds: auto (the run dtype) | fp8_e4m3 | int8 (codes and a scale per
    # row, engine/kv_quant.py); a decode pool takes KV only from a prefill pool of the same kind
    kv_cache_dtype: Literal["auto", "fp8_e4m3", "int8"] = "auto"
    expert_parallel_size: int = Field(default=1, ge=1, le=256)
    num_cpus: NonNegativeFloat = 1.0
    num_gpus: NonNegativeFloat = 0.0  # > 0: the worker runs on CUDA (per rank)
    resources: dict[str, NonNegativeFloat] = Field(default_factory=dict)  # custom Ray resources
    node_labels: dict[str, str] = Field(default_factory=dict)  # Ray node labels the worker must match
    # Compute threads of each worker (per rank): torch's and the C kernels'. None: Ray's default for
    # an actor of num_cpus, floor(num_cpus) but at least 1 — one thread for a 0.5-CPU worker.
    threads: int | None = Field(default=None, ge=1, le=1024)

    @field_validator("resources")
    @classmethod
    def _no_builtin_resources(cls, v: dict[str, float]) -> dict[str, float]:
        for name in ("CPU", "GPU", "memory"):
            if name in v:
                raise ValueError(f"{name!r} is set with num_cpus / num_gpus, not in resources")
        return v

    @model_validator(mode="after")
    def _one_group(self) -> PoolConfig:
        tp, ep = self.tensor_parallel_size, self.expert_parallel_size
        if tp > 1 and ep > 1 and tp != ep:
            raise ValueError(
                f"expert_parallel_size {ep} and tensor_parallel_size {tp}: a worker's ranks split "
                "attention and experts alike, so each must be 1 or the other's value"
            )
        return self

    @property
    def ranks(self) -> int:
        """Processes (devices) per worker."""
        return max(self.tensor_parallel_size, self.expert_parallel_size)

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


class PoolsConfig(_Strict):
    prefill: PoolConfig = PoolConfig()
    decode: PoolConfig = PoolConfig()

    @model_validator(mode="after")
    def _decode_needed(self) -> PoolsConfig:
        if self.decode.replicas < 1:
            raise ValueError("decode.replicas must be >= 1: every request is decoded by a decode worker")
        return self


class TierCapacity(_Strict):
    """One tier's size (the tiers' own configuration, memory_tiers.tier_store.TierConfig, is derived
    from these: deploy/derive.py)."""

    capacity: ByteSize  # bytes, or "512MiB", "2GB", ...

    @field_validator("capacity")
    @classmethod
    def _positive(cls, v: ByteSize) -> ByteSize:
        if v <= 0:
            raise ValueError("capacity must be > 0")
        return v


class TiersConfig(_Strict):
    dir: Path = Path("~/.cache/tandem/tiers")  # G3 files live under <dir>/<worker id>/
    g1: TierCapacity = TierCapacity(capacity=ByteSize(256 << 20))  # device KV pool (CPU memory on a CPU box)
    g2: TierCapacity = TierCapacity(capacity=ByteSize(1 << 30))  # host DRAM
    g3: TierCapacity | None = TierCapacity(capacity=ByteSize(4 << 30))  # disk; null turns it off

    @property
    def resolved_dir(self) -> Path:
        """The directory, with the default ``~/.cache/tandem`` root following ``$TANDEM_HOME``."""
        root = Path("~/.cache/tandem")
        if self.dir.parts[: len(root.parts)] == root.parts and os.environ.get("TANDEM_HOME"):
            return Path(os.environ["TANDEM_HOME"]).joinpath(*self.dir.parts[len(root.parts) :])
        return self.dir.expanduser()


class NodeTopology(_Strict):
    nvlink_domain: str | None = None
    rack: str | None = None


class TopologyConfig(_Strict):
    # Keyed by node name: the Ray node's `tandem/node` label, else its IP address.
    nodes: dict[str, NodeTopology] = Field(default_factory=dict)
    link_gbps: dict[str, PositiveFloat] = Field(default_factory=dict)  # GB/s by link class, over calibration
    calibration_file: Path | None = None  # written by `tandem kv-bench --calibration FILE`
    same_node_link: Literal["shm", "pcie", "nvlink"] = "shm"

    @field_validator("nodes")
    @classmethod
    def _named_nodes(cls, v: dict[str, NodeTopology]) -> dict[str, NodeTopology]:
        if any(not name.strip() for name in v):
            raise ValueError("node names must not be empty: an empty name never matches a Ray node")
        return v

    @field_validator("link_gbps")
    @classmethod
    def _known_links(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = [k for k in v if parse_link_class(k) is None]
        if unknown:
            raise ValueError(
                f"unknown link classes {unknown}; use same_process, nvlink, shm, pcie, ib or tcp"
            )
        return v


class RedisTlsConfig(_Strict):
    """TLS to Redis (a ``rediss://`` store): the CA that signed its certificate, and this client's
    certificate and key when Redis asks for one (``tls-auth-clients``)."""

    ca_file: Path | None = None  # None: the system's CAs
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> RedisTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (this client's certificate and its key)")
        return self


class MetadataConfig(_Strict):
    store: str = "memory"  # "memory" or redis://[user@]host:port[/db] (rediss:// for TLS)
    heartbeat_ttl_s: PositiveFloat = 10.0
    heartbeat_interval_s: PositiveFloat = 2.0
    # the Redis password is read from this environment variable (never written in the YAML)
    password_env: str | None = Field(default=None, min_length=1)
    tls: RedisTlsConfig | None = None  # with a rediss:// store

    @field_validator("store")
    @classmethod
    def _memory_or_redis(cls, v: str) -> str:
        if v == "memory":
            return v
        url = urlparse(v)
        if url.scheme not in ("redis", "rediss"):
            raise ValueError(f'must be "memory" or a redis:// / rediss:// URL, got {v!r}')
        try:
            port = url.port
        except ValueError as e:
            raise ValueError(f"bad port in {v!r}: {e}") from None
        if not url.hostname:
            raise ValueError(f"redis URL {v!r} has no host")
        if port is not None and port == 0:
            raise ValueError(f"bad port in {v!r}: must be 1-65535")
        db = url.path.lstrip("/")
        if db and not db.isdigit():
            raise ValueError(f"redis database in {v!r} must be a number, got {db!r}")
        return v

    @model_validator(mode="after")
    def _redis_options(self) -> MetadataConfig:
        if (self.password_env or self.tls) and not self.is_redis:
            raise ValueError("password_env and tls are for a redis:// store, not 'memory'")
        if self.tls is not None and not self.store.startswith("rediss://"):
            raise ValueError("tls needs a rediss:// store (redis:// is plaintext)")
        return self

    @model_validator(mode="after")
    def _interval_below_ttl(self) -> MetadataConfig:
        if self.heartbeat_interval_s >= self.heartbeat_ttl_s:
            raise ValueError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be below heartbeat_ttl_s "
                f"({self.heartbeat_ttl_s}), or live workers expire between heartbeats"
            )
        return self

    @property
    def is_redis(self) -> bool:
        return self.store != "memory"


class TracingConfig(_Strict):
    """OpenTelemetry export of the router and of every prefill / decode worker (one trace per
    request across them; router/telemetry.py, pool_runtime/tracing.py). Tests use the in-memory
    exporter, not set here."""

    exporter: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str = "http://127.0.0.1:4317"


class HttpConfig(_Strict):
    """The OpenAI-compatible HTTP front door, served beside gRPC by the same router (router/http/)."""

    enabled: bool = True
    host: str | None = None  # None: router.host
    port: int = Field(default=8000, ge=0, le=65535)  # 0: the OS picks a free port (tests)
    max_request_bytes: ByteSize = Field(default=ByteSize(8 << 20), gt=0)  # a larger body is a 413


class TlsConfig(_Strict):
    """TLS on both front doors (gRPC and HTTP): the server's certificate chain and key (PEM);
    ``client_ca_file`` set: clients must present a certificate it signed (mTLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


class RateLimitConfig(_Strict):
    """A token bucket per API key (per client address without keys): ``requests_per_s`` refill,
    ``burst`` capacity; in Redis (shared by every router) when the metadata store is Redis."""

    requests_per_s: PositiveFloat
    burst: int = Field(default=10, ge=1)


class SecurityConfig(_Strict):
    """Who may call the router (router/security.py). The default, no keys and no TLS, is meant for
    the loopback bind it comes with; a non-loopback bind without either logs a warning."""

    api_keys_file: Path | None = None  # one key per line; '#' comments
    api_keys_env: str | None = Field(
        default=None, min_length=1
    )  # an environment variable: keys, comma-separated
    tls: TlsConfig | None = None
    allow_unauthenticated_health: bool = False  # gRPC health checks and GET /health without a key
    rate_limit: RateLimitConfig | None = None


class LimitsConfig(_Strict):
    """Bounds on one request (router/validation.py's RequestLimits); over one: INVALID_ARGUMENT / 400
    (a gRPC message over max_message_bytes: RESOURCE_EXHAUSTED; an HTTP body over
    router.http.max_request_bytes: 413)."""

    max_prompt_tokens: int | None = Field(default=None, ge=1)  # None: the context length
    max_stop_strings: int = Field(default=16, ge=0)
    max_stop_length: int = Field(default=256, ge=1)
    max_stop_token_ids: int = Field(default=64, ge=0)
    max_logprobs: int = Field(default=20, ge=0)
    max_n: int = Field(default=32, ge=1)
    max_chat_messages: int = Field(default=1024, ge=1)
    max_message_bytes: ByteSize = Field(default=ByteSize(4 << 20), gt=0)  # one gRPC message


class RouterConfig(_Strict):
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=50051, ge=0, le=65535)  # 0: the OS picks a free port (tests)
    policy: Literal["cost_model", "least_loaded", "round_robin"] = "cost_model"
    disaggregation: Literal["auto", "always", "never"] = "auto"
    max_queue: int = Field(default=256, ge=1)  # requests waiting for a slot; beyond: RESOURCE_EXHAUSTED
    max_concurrency: int = Field(default=64, ge=1)  # requests in flight at once
    max_tokens_limit: int | None = Field(default=None, ge=1)  # per request; None: the model's context length
    tracing: TracingConfig = TracingConfig()
    http: HttpConfig = HttpConfig()
    security: SecurityConfig = SecurityConfig()
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="after")
    def _distinct_ports(self) -> RouterConfig:
        http_host = self.http.host or self.host
        if self.http.enabled and self.port and self.port == self.http.port and http_host == self.host:
            raise ValueError(f"http.port {self.http.port} is the gRPC port too: give them different ports")
        return self


class RaySection(_Strict):
    """Where ``tandem launch`` / ``status`` / ``stop`` find the cluster (``--address`` wins)."""

    address: str | None = None  # "HOST:6379" or "auto"; None: RAY_ADDRESS, else "auto"
    namespace: str = Field(default="tandem", min_length=1)  # the named, detached actors live here


class TandemConfig(_Strict):
    version: Literal[1] = 1
    # "smollm2" (SmolLM2-135M-Instruct, fetched on first use), "demo" (random tiny, made locally), a
    # checkpoint directory or a GGUF file (engine.model_source)
    model: str = Field(default="smollm2", min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    engine: EngineSection = EngineSection()
    pools: PoolsConfig = PoolsConfig()
    tiers: TiersConfig = TiersConfig()
    topology: TopologyConfig = TopologyConfig()
    metadata: MetadataConfig = MetadataConfig()
    router: RouterConfig = RouterConfig()
    ray: RaySection = RaySection()

    @model_validator(mode="after")
    def _cross_checks(self) -> TandemConfig:
        if self.router.disaggregation == "always" and self.pools.prefill.replicas < 1:
            raise ValueError("router.disaggregation is 'always' but pools.prefill.replicas is 0")
        return self

    @property
    def is_demo(self) -> bool:
        return self.model == "demo"


def check_tensor_parallel_sizes(
    cfg: TandemConfig, num_heads: int, num_kv_heads: int, intermediate_size: int | None, model: str
) -> None:
    """Raise ConfigError, naming the field, unless each pool's ``tensor_parallel_size`` splits a
    model of these heads (``model`` names it in the message; deploy/derive.py reads the numbers
    from the checkpoint)."""
    from engine.tp_layout import check_tensor_parallel

    problems = []
    for role in ("prefill", "decode"):
        pool: PoolConfig = getattr(cfg.pools, role)
        if pool.replicas == 0:
            continue
        try:
            check_tensor_parallel(pool.tensor_parallel_size, num_heads, num_kv_heads, intermediate_size)
        except ValueError as e:
            problems.append(f"pools.{role}.tensor_parallel_size: {e} ({model})")
    if problems:
        raise ConfigError("\n".join(problems))


def check_expert_parallel_sizes(
    cfg: TandemConfig, num_experts: int, expert_widths: tuple[int, ...], model: str
) -> None:
    """Raise ConfigError, naming the field, unless each pool's ``expert_parallel_size`` splits the
    model's ``num_experts`` routed experts (0: a dense model, which has none to split) and, where the
    experts are not split but the heads are, ``tensor_parallel_size`` splits every expert's width."""
    from engine.tp_layout import check_expert_parallel

    problems = []
    for role in ("prefill", "decode"):
        pool: PoolConfig = getattr(cfg.pools, role)
        if pool.replicas == 0:
            continue
        ep, tp = pool.expert_parallel_size, pool.tensor_parallel_size
        if ep > 1 and num_experts == 0:
            problems.append(
                f"pools.{role}.expert_parallel_size: {ep}, but the model has no experts ({model})"
            )
        elif ep > 1:
            try:
                check_expert_parallel(ep, num_experts)
            except ValueError as e:
                problems.append(f"pools.{role}.expert_parallel_size: {e} ({model})")
        elif tp > 1 and any(w % tp for w in expert_widths):
            problems.append(
                f"pools.{role}.tensor_parallel_size: {tp} does not divide the experts' widths "
                f"{list(expert_widths)} ({model})"
            )
    if problems:
        raise ConfigError("\n".join(problems))


def default_config() -> TandemConfig:
    """The embedded default: one prefill and one decode worker on this machine, SmolLM2-135M-Instruct,
    in-process metadata, tiers under ~/.cache/tandem/tiers, router on 127.0.0.1:50051."""
    return TandemConfig(
        # a step bounded to 120 ms: about two decode steps of 16 streams on a 2-core CPU
        # (docs/serving-path.md); at 16 streams it cost no throughput, and ITL p99 fell 5x
        engine=EngineSection(max_step_time_ms=120.0),
        pools=PoolsConfig(
            prefill=PoolConfig(replicas=1, num_cpus=0.5),
            # the decode worker computes every step: both cores' threads, not Ray's one
            decode=PoolConfig(replicas=1, num_cpus=0.5, threads=2),
        ),
        # 64 streams of 384 tokens of SmolLM2's fp32 KV (46 KiB a token) need 1.1 GiB
        tiers=TiersConfig(g1=TierCapacity(capacity=ByteSize(1536 << 20))),
    )


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each starting with the field's dotted path."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> TandemConfig:
    """Validate an already-parsed YAML document (``None``, an empty file, means all defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return TandemConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid configuration\n{format_validation_error(e)}") from None


def load_config(path: str | Path) -> TandemConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read configuration ({e.strerror or e})") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    return parse_config(data, str(p))


def dump_config(cfg: TandemConfig) -> str:
    """The configuration as YAML that :func:`load_config` reads back to an equal object."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
