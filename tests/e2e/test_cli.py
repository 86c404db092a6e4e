"""The `tandem` command line, run as a user runs it: a subprocess per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def tandem(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TANDEM_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_make_model_then_generate_json_matches_the_engine(tmp_path: Path) -> None:
    out = tmp_path / "m"
    r = tandem("make-model", "--out", str(out), "--preset", "tiny", "--arch", "qwen2", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    r = tandem("generate", "--model", str(out), "Hello world", "--max-tokens", "12", "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert len(got["token_ids"]) == got["num_tokens"] <= 12

    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=out))
    want = engine.generate(["Hello world"], SamplingParams(max_tokens=12))[0]
    engine.close()
    assert got["token_ids"] == want.new_token_ids
    assert got["text"] == want.text


def test_generate_streams_text_from_the_demo_checkpoint(tmp_path: Path) -> None:
    r = tandem(
        "generate", "Once upon a time", "--model", "demo", "--max-tokens", "8", "--ignore-eos", home=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert "[8 tokens, length" in r.stderr
    assert (tmp_path / "models").is_dir()  # the demo checkpoint was made on first use, under TANDEM_HOME


def test_bad_arguments_get_a_clear_error(tmp_path: Path) -> None:
    r = tandem("generate", "hi", "--top-p", "1.5", home=tmp_path)
    assert r.returncode == 2
    assert "top_p" in r.stderr
    r = tandem("no-such-command", home=tmp_path)
    assert r.returncode == 2
    assert "usage: tandem" in r.stderr
