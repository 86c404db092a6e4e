"""deploy/examples/deepseek-v3-ep-gpu.yaml and its memory arithmetic (deploy/memory.py): the
tables beside the example are what the command it names prints today, the model sizes agree with the
published ones (DeepSeek-V3: 671B total, 37B active; the 16B shape: 16B total, 3B active), and the
pools' tensor / expert parallel sizes split both models."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from deploy.config import load_config
from deploy.derive import check_model
from deploy.memory import active_params, markdown, rank_memory
from engine.config import ModelConfig
from engine.tp_layout import Parallelism

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "deploy" / "examples"


def _config(name: str) -> ModelConfig:
    return ModelConfig.from_dict(json.loads((EXAMPLES / name).read_text()), dtype="bfloat16")


def test_the_arithmetic_beside_the_example_is_what_its_command_prints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = (EXAMPLES / "deepseek-v3-ep-gpu.md").read_text()
    command = doc.split("```sh\n", 1)[1].split("\n```", 1)[0]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "deploy.memory"]
    monkeypatch.chdir(REPO)
    assert doc.endswith("\n" + markdown(argv[3], argv[4:]))


def test_model_sizes_agree_with_the_published_ones() -> None:
    v3, small = _config("deepseek-v3-671b.config.json"), _config("deepseek-v3-16b.config.json")
    whole = rank_memory(v3, Parallelism())
    assert 670e9 < whole.total < 672e9 and 37e9 < active_params(v3) < 38e9
    assert 15.5e9 < rank_memory(small, Parallelism()).total < 16.5e9 and 2.7e9 < active_params(small) < 3.1e9
    assert whole.kv_bytes_per_token == 61 * (512 + 64) * 2  # MLA's latent, every layer, bf16
    # expert parallelism divides the routed experts, and only them
    ep8 = rank_memory(v3, Parallelism(8, 8, 8))
    assert ep8.params["routed experts"] * 8 == whole.params["routed experts"]
    assert ep8.params["shared experts"] == whole.params["shared experts"]
    assert ep8.params["embedding"] == whole.params["embedding"]


def test_the_example_splits_both_models(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLES / "deepseek-v3-ep-gpu.yaml")
    assert (cfg.pools.prefill.expert_parallel_size, cfg.pools.decode.expert_parallel_size) == (4, 8)
    for name in ("deepseek-v3-16b.config.json", "deepseek-v3-671b.config.json"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((EXAMPLES / name).read_text())
        check_model(cfg, d)  # raises ConfigError naming the field when a split does not divide
