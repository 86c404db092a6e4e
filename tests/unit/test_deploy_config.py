"""deploy.config: the shipped YAML files validate, and bad files fail naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.config import (
    LOCAL_YAML,
    ConfigError,
    TandemConfig,
    check_tensor_parallel_sizes,
    default_config,
    dump_config,
    load_config,
    parse_config,
)

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def test_local_yaml_is_the_embedded_default() -> None:
    cfg = load_config(LOCAL_YAML)
    assert cfg == default_config()
    assert (cfg.router.host, cfg.router.port) == ("127.0.0.1", 50051)
    assert (cfg.pools.prefill.replicas, cfg.pools.decode.replicas) == (1, 1)
    assert cfg.model == "smollm2" and not cfg.is_demo and not cfg.metadata.is_redis
    assert (cfg.tiers.g1.capacity, cfg.tiers.g2.capacity) == (1536 << 20, 1 << 30)
    assert cfg.tiers.g3 is not None and cfg.tiers.g3.capacity == 4 << 30


def test_default_tier_dir_follows_tandem_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tiers = default_config().tiers
    monkeypatch.delenv("TANDEM_HOME", raising=False)
    assert tiers.resolved_dir == Path.home() / ".cache/tandem/tiers"
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    assert tiers.resolved_dir == tmp_path / "tiers"
    custom = parse_config({"tiers": {"dir": "/srv/kv"}}).tiers  # an explicit directory stays put
    assert custom.resolved_dir == Path("/srv/kv")


def test_dump_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    cfg = load_config(EXAMPLES / "two-node-gpu.yaml")
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == TandemConfig()


def test_two_node_gpu_example() -> None:
    cfg = load_config(EXAMPLES / "two-node-gpu.yaml")
    assert cfg.pools.prefill.node_labels == {"tandem/gpu": "h100"}
    assert cfg.pools.decode.node_labels == {"tandem/gpu": "h200"}
    assert (cfg.pools.prefill.device, cfg.pools.decode.device) == ("cuda", "cuda")
    assert cfg.metadata.store == "redis://tandem-redis.internal:6379/0"
    assert cfg.topology.nodes["h200-0"].rack == "rack-a"
    assert cfg.topology.link_gbps == {"ib": 45.0, "tcp": 2.5}
    assert cfg.router.tracing.exporter == "otlp"


def test_every_example_validates() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert files
    for path in files:
        load_config(path)


def _error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ")
    return msg


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("pools: {decode: {replicas: 0}}", "pools: decode.replicas must be >= 1"),
        (
            "pools: {prefill: {replicas: -1}}",
            "pools.prefill.replicas: Input should be greater than or equal to 0",
        ),
        (
            "pools: {prefill: {replicas: 0}}\nrouter: {disaggregation: always}",
            "router.disaggregation is 'always' but pools.prefill.replicas is 0",
        ),
        ("pools: {decode: {resources: {GPU: 1}}}", "pools.decode.resources: 'GPU' is set with"),
        (
            "pools: {decode: {num_gpus: -1}}",
            "pools.decode.num_gpus: Input should be greater than or equal to 0",
        ),
        ("router: {port: 70000}", "router.port: Input should be less than or equal to 65535"),
        (
            "router: {policy: random}",
            "router.policy: Input should be 'cost_model', 'least_loaded' or 'round_robin'",
        ),
        (
            "router: {disaggregation: sometimes}",
            "router.disaggregation: Input should be 'auto', 'always' or 'never'",
        ),
        ("router: {max_queue: 0}", "router.max_queue: Input should be greater than or equal to 1"),
        (
            "router: {tracing: {exporter: jaeger}}",
            "router.tracing.exporter: Input should be 'none', 'console' or 'otlp'",
        ),
        ("metadata: {store: 'mysql://db'}", 'metadata.store: must be "memory" or a redis://'),
        (
            "metadata: {store: 'redis://host:99999'}",
            "metadata.store: bad port in 'redis://host:99999'",
        ),
        (
            "metadata: {store: 'redis://:6379'}",
            "metadata.store: redis URL 'redis://:6379' has no host",
        ),
        ("metadata: {store: 'redis://h:6379/zero'}", "metadata.store: redis database in"),
        (
            "metadata: {heartbeat_interval_s: 20}",
            "metadata: heartbeat_interval_s (20.0) must be below",
        ),
        ("tiers: {g2: {capacity: 0}}", "tiers.g2.capacity: capacity must be > 0"),
        (
            "tiers: {g1: {capacity: lots}}",
            "tiers.g1.capacity: could not parse value and unit from byte string",
        ),
        (
            "topology: {link_gbps: {warp: 9}}",
            "topology.link_gbps: unknown link classes ['warp']",
        ),
        ("topology: {link_gbps: {tcp: 0}}", "topology.link_gbps.tcp: Input should be greater than 0"),
        (
            "topology: {same_node_link: tcp}",
            "topology.same_node_link: Input should be 'shm', 'pcie' or 'nvlink'",
        ),
        ("dtype: float8", "dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
        ("model: ''", "model: String should have at least 1 character"),
        ("routr: {port: 1}", "routr: Extra inputs are not permitted"),
        ("pools: {decode: {replica: 2}}", "pools.decode.replica: Extra inputs are not permitted"),
        ("version: 2", "version: Input should be 1"),
        (
            "pools: {decode: {tensor_parallel_size: 0}}",
            "pools.decode.tensor_parallel_size: Input should be greater than or equal to 1",
        ),
    ],
)
def test_bad_files_name_the_field(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in _error(tmp_path, text)


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    msg = _error(tmp_path, "router: {port: -1, max_concurrency: 0}")
    assert msg.splitlines()[1:] == [
        "router.port: Input should be greater than or equal to 0",
        "router.max_concurrency: Input should be greater than or equal to 1",
    ]


def test_yaml_syntax_and_shape_errors(tmp_path: Path) -> None:
    assert "not valid YAML at line 3 column 1" in _error(tmp_path, "router:\n  port: [1\n")
    assert "the top level must be a mapping of sections, got list" in _error(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "missing.yaml")


def test_redis_and_sizes_accepted() -> None:
    cfg = parse_config(
        {
            "metadata": {"store": "rediss://user:pw@r.example:6380/2"},
            "tiers": {"g1": {"capacity": "1.5GiB"}, "g3": None},
        }
    )
    assert cfg.metadata.is_redis
    assert cfg.tiers.g1.capacity == 1610612736
    assert cfg.tiers.g3 is None


def test_tensor_parallel_size_is_checked_against_the_models_heads() -> None:
    ok = parse_config(
        {"pools": {"prefill": {"tensor_parallel_size": 2}, "decode": {"tensor_parallel_size": 4}}}
    )
    check_tensor_parallel_sizes(ok, 4, 2, 128, "m")  # 4 ranks: each of the 2 KV heads replicated twice
    bad = parse_config(
        {"pools": {"prefill": {"tensor_parallel_size": 3}, "decode": {"tensor_parallel_size": 8}}}
    )
    with pytest.raises(ConfigError) as info:
        check_tensor_parallel_sizes(bad, 4, 2, 128, "/models/m")
    assert str(info.value).splitlines() == [
        "pools.prefill.tensor_parallel_size: tensor_parallel_size 3 does not divide the model's 4 "
        "attention heads (/models/m)",
        "pools.decode.tensor_parallel_size: tensor_parallel_size 8 does not divide the model's 4 "
        "attention heads (/models/m)",
    ]
    with pytest.raises(ConfigError, match="pools.decode.tensor_parallel_size: .*4 .* intermediate_size 130"):
        check_tensor_parallel_sizes(ok, 4, 2, 130, "m")  # splits in 2, not in 4
    idle = parse_config({"pools": {"prefill": {"replicas": 0, "tensor_parallel_size": 3}}})
    check_tensor_parallel_sizes(idle, 4, 2, 128, "m")  # a pool without workers splits nothing


def test_check_model_reads_the_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    from deploy.derive import check_model

    with pytest.raises(
        ConfigError, match=f"pools.decode.tensor_parallel_size: .*3 .* 4 attention heads \\({checkpoint}\\)"
    ):
        check_model(parse_config({"pools": {"decode": {"tensor_parallel_size": 3}}}), checkpoint)
    check_model(parse_config({"pools": {"decode": {"tensor_parallel_size": 2}}}), checkpoint)
    check_model(parse_config({"pools": {"decode": {"tensor_parallel_size": 3}}}), tmp_path / "elsewhere")
