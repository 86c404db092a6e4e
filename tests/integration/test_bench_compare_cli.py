"""``tandem bench compare`` runs end to end: it starts ``tandem serve`` for a setup, drives it over
the OpenAI API and reports every request (figures are not checked: speed is measured by the
benchmark itself, never asserted in tests). Each server it starts gets a TANDEM_HOME of its own,
so that KV tier files an earlier run left on disk cannot serve its seeded prompts from cache (seen
with SmolLM2 after a few runs; the demo model's runs are too small to spill to disk, so the wiring
is what is tested here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_compare
from benchmarks.compare_servers import tandem_server
from engine.demo import demo_model_dir
from engine.smollm2 import downloads_dir

pytestmark = pytest.mark.integration


def test_tandem_servers_get_their_own_home_and_the_usual_downloads(tmp_path: Path) -> None:
    s = tandem_server("engine", "demo", home=tmp_path / "h")
    assert s.env == {"TANDEM_HOME": str(tmp_path / "h"), "TANDEM_DOWNLOADS": str(downloads_dir())}
    assert tandem_server("engine", "demo").env == {}  # without a home: the caller's environment


def test_bench_compare_serves_every_request_and_keeps_the_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    argv = ["--model", str(demo_model_dir()), "--setups", "engine", "--concurrency", "2", "--requests",
            "4", "--input-len", "24", "--output-len", "4", "--warmup", "0", "--json", str(out),
            "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    assert bench_compare.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| engine | 2 |" in printed and "host: " in printed
    s = json.loads(out.read_text())["runs"]["engine"]["2"]
    assert (s["ok"], s["requests"], s["output_tokens"]) == (4, 4, 16)
    assert (tmp_path / "logs" / "engine.log").stat().st_size > 0
