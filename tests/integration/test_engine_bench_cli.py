"""The engine's benchmark commands run end to end on the demo checkpoint (figures are not checked
here: speed is measured by the benchmarks themselves, never asserted in tests)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from benchmarks import bench_engine as bench
from benchmarks import bench_kernels
from engine.demo import demo_model_dir
from engine.kernels.native import capability
from engine.linear import cpu_gemm_available, onednn_available

pytestmark = pytest.mark.integration


def _args(module: object, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    module.add_arguments(p)  # type: ignore[attr-defined]
    return p.parse_args(argv)


def test_bench_kernels_json_covers_every_backend_and_row_count(capsys: pytest.CaptureFixture[str]) -> None:
    args = _args(
        bench_kernels, ["--model", str(demo_model_dir()), "--rows", "1", "7", "--reps", "2", "--json"]
    )
    assert bench_kernels.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    backends = (
        ["torch"] + (["onednn"] if onednn_available() else []) + (["cpu"] if cpu_gemm_available() else [])
    )
    assert [(r["backend"], r["rows"]) for r in out["results"]] == [(b, n) for b in backends for n in (1, 7)]
    for r in out["results"]:
        assert r["ms"] > 0 and r["gflops"] > 0
        if r["backend"] == "torch":
            assert r["vs_torch"] == 1.0
    assert f"C kernels {capability()}" in out["host"]


@pytest.mark.parametrize("linear", ["torch", "auto"])
def test_bench_engine_runs_tandem_with_a_chosen_linear_backend(
    linear: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(demo_model_dir()), "--num-requests", "5", "--concurrency", "2"]
    argv += ["--prompt-len", "3", "9", "--output-len", "2", "5", "--skip-reference", "--json"]
    args = _args(bench, [*argv, "--linear-backend", linear])
    assert bench.run(args) == 0  # run() itself asserts every requested output token was produced
    out = json.loads(capsys.readouterr().out)
    assert out["ratio"] is None and len(out["results"]) == 1 and out["results"][0]["tokens_per_s"] > 0
    assert torch.backends.cpu.get_cpu_capability() in out["host"]  # figures carry the CPU they ran on


def test_bench_engine_arch_puts_moe_and_mla_beside_the_dense_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "--arch",
        "deepseek_v3",
        "mixtral",
        "--preset",
        "tiny",
        "--num-requests",
        "3",
        "--concurrency",
        "2",
    ]
    argv += ["--prompt-len", "3", "9", "--output-len", "2", "4", "--json"]
    assert bench.run(_args(bench, argv)) == 0  # run_tandem asserts every requested token was produced
    out = json.loads(capsys.readouterr().out)
    rows = {r["arch"]: r for r in out["results"]}
    assert [r["arch"] for r in out["results"]] == ["llama", "deepseek_v3", "mixtral"]  # the dense one first
    assert rows["llama"]["vs_dense"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["deepseek_v3"]["kv_bytes_per_token"] < rows["llama"]["kv_bytes_per_token"]  # the latent
    assert rows["mixtral"]["active_params"] < rows["mixtral"]["params"]  # 2 of 8 experts per token
