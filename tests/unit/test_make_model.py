"""make_model: checkpoint layout, determinism, sharding, tokenizer, CLI, demo; transformers loads it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from deploy.cli import main as cli_main
from engine import demo
from engine.make_model import ARCHS, CORPUS, PRESETS, make_model, param_shapes
from engine.tokenizer import Tokenizer

SAMPLES = [
    "Hello world! The lighthouse keeper counted 112 steps.",
    "A café in Zürich serves crème brûlée; naïve 日本語 🚀👍 🇯🇵 €12,500.",
    "  spaces   and\ttabs\n\nnew lines, don't we'll I'm 3.14159",
    "<s> literal specials </s> <pad>",
]


def _load_all(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return load_file(path / "model.safetensors")
    files = set(json.loads(index.read_text())["weight_map"].values())
    out: dict[str, torch.Tensor] = {}
    for f in sorted(files):
        out.update(load_file(path / f))
    return out


DENSE = ("llama", "mistral", "qwen2", "qwen3")  # the preset's widths as they are (MoE / MLA: below)


@pytest.mark.unit
@pytest.mark.parametrize("arch", DENSE)
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_checkpoint_layout(tmp_path: Path, arch: str, preset: str) -> None:
    path = make_model(tmp_path / "m", preset, arch, seed=1)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [ARCHS[arch]] and cfg["model_type"] == arch
    for key, value in PRESETS[preset].items():
        assert cfg[key] == value
    assert cfg["head_dim"] * cfg["num_attention_heads"] == cfg["hidden_size"]
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 1
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (path / name).is_file()

    weights = _load_all(path)
    shapes = dict(param_shapes(cfg))
    assert {n: tuple(t.shape) for n, t in weights.items()} == shapes
    assert all(t.dtype == torch.float32 for t in weights.values())
    has_bias = "model.layers.0.self_attn.q_proj.bias" in weights
    assert has_bias == (arch == "qwen2")
    assert "lm_head.weight" in weights
    if arch == "mistral":
        assert cfg["sliding_window"] is None
    std = float(weights["model.layers.0.mlp.up_proj.weight"].std())
    assert 0.018 < std < 0.022

    tok = Tokenizer.from_pretrained(path)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids) == (cfg["vocab_size"], 0, (1,))
    for text in SAMPLES[:3]:
        ids = tok.encode(text)
        assert ids[0] == 0 and max(ids) < cfg["vocab_size"]
        assert tok.decode(ids) == text
        assert tok.encode(text, add_special_tokens=False) == ids[1:]
    # Special-token text in the input maps to the special ids (as with AutoTokenizer).
    ids = tok.encode(SAMPLES[3])
    assert [i for i in ids if i < 4] == [0, 0, 1, 3]
    assert tok.decode(ids) == " literal specials  "
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + SAMPLES[3]


@pytest.mark.unit
def test_bench_preset_sizes() -> None:
    from engine.make_model import build_config

    cfg = build_config("bench", "llama", "float32", None)
    n = sum(torch.Size(s).numel() for _, s in param_shapes(cfg))
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (512, 8, 4096)
    assert n == 2 * 4096 * 512 + 8 * (2 * 512 + 2 * 512 * 512 + 2 * 256 * 512 + 3 * 512 * 1536) + 512


@pytest.mark.unit
def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = make_model(tmp_path / "a", "tiny", "qwen2", seed=7, num_shards=2)
    b = make_model(tmp_path / "b", "tiny", "qwen2", seed=7, num_shards=2)
    c = make_model(tmp_path / "c", "tiny", "qwen2", seed=8, num_shards=2)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    shard = "model-00001-of-00002.safetensors"
    assert (a / shard).read_bytes() != (c / shard).read_bytes()


@pytest.mark.unit
def test_sharded_index(tmp_path: Path) -> None:
    single = make_model(tmp_path / "one", "tiny", "llama", seed=3)
    path = make_model(tmp_path / "three", "tiny", "llama", seed=3, num_shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(set(index["weight_map"].values())) == files
    assert not (path / "model.safetensors").exists()
    reference = load_file(single / "model.safetensors")
    assert set(index["weight_map"]) == set(reference)
    total = 0
    for f in files:
        with safe_open(path / f, "pt") as sf:
            keys = set(sf.keys())
            assert keys == {n for n, v in index["weight_map"].items() if v == f}
            for k in keys:
                t = sf.get_tensor(k)
                assert torch.equal(t, reference[k])
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total


@pytest.mark.unit
def test_dtype_and_overrides(tmp_path: Path) -> None:
    path = make_model(tmp_path / "m", "tiny", dtype="bfloat16", overrides={"num_hidden_layers": 3})
    weights = load_file(path / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert "model.layers.2.mlp.down_proj.weight" in weights
    assert "model.layers.3.mlp.down_proj.weight" not in weights
    with pytest.raises(ValueError):
        make_model(tmp_path / "bad", "tiny", arch="gpt2")
    with pytest.raises(ValueError):
        make_model(tmp_path / "bad", "tiny", overrides={"vocab_size": 10**6})  # corpus too small


@pytest.mark.unit
def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    rc = cli_main(
        [
            "make-model",
            "--out",
            str(out),
            "--arch",
            "mistral",
            "--num-shards",
            "2",
            "--set",
            "num_hidden_layers=3",
        ]
    )
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"]) == ("mistral", 3)
    assert (out / "model.safetensors.index.json").is_file()
    assert "MistralForCausalLM" in capsys.readouterr().out


@pytest.mark.unit
def test_corpus_has_multibyte_text() -> None:
    text = CORPUS.read_text(encoding="utf-8")
    assert 20_000 < len(text.encode()) < 500_000
    for s in ("café", "naïve", "日本語", "🚀"):
        assert s in text


@pytest.mark.unit
def test_demo_model_dir_races(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(demo.demo_model_dir())
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    path = results[0]
    assert path.parent == tmp_path / "models"
    assert [p.name for p in (tmp_path / "models").iterdir()] == [path.name]  # temp dirs cleaned up
    assert Tokenizer.from_pretrained(path).vocab_size == PRESETS[demo.DEMO_PRESET]["vocab_size"]
    assert path.name == f"tiny-llama-s0-v{demo.VERSION}"
    assert demo.demo_model_dir() == path


@pytest.mark.unit
def test_every_arch_is_offered() -> None:
    assert set(ARCHS) == {*DENSE, "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"}


# ------------------------------------------------------------------ transformers as the reference


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_new_families_load_in_transformers_and_the_engine_alike(tmp_path: Path, arch: str) -> None:
    """The family's class loads the checkpoint (its tokenizer too), the engine parses the same
    experts / latent sizes, and both compute the same logits (fp32, atol 1e-4)."""
    transformers = pytest.importorskip("transformers")
    from engine.attention import AttentionMetadata
    from engine.model import load_model

    path = make_model(tmp_path / "m", "tiny", arch, seed=2)
    cfg = json.loads((path / "config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == ARCHS[arch]
    ours = load_model(path)
    weights = _load_all(path)
    assert {n: tuple(t.shape) for n, t in weights.items()} == dict(param_shapes(cfg))
    moe, dense_width = ours.config.moe, PRESETS["tiny"]["intermediate_size"]
    if moe is not None:  # the active MLP of a token: about the dense preset's
        active = moe.top_k * moe.intermediate_size + moe.shared_intermediate_size
        assert 0.75 * dense_width <= active <= dense_width
    assert (ours.config.mla is not None) == (arch == "deepseek_v3")
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = Tokenizer.from_pretrained(path).encode(SAMPLES[1])
    assert hf_tok(SAMPLES[1])["input_ids"] == ids
    n = len(ids)
    kv = ours.kv_layout(8).allocate(-(-n // 8))
    meta = AttentionMetadata.build([n], [n], [list(range(-(-n // 8)))], 8)
    got = ours.compute_logits(ours.forward(torch.tensor(ids), torch.arange(n), kv, meta))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.integration
@pytest.mark.parametrize(
    "arch,preset,shards",
    [("llama", "tiny", 1), ("qwen2", "tiny", 2), ("mistral", "tiny", 1), ("llama", "bench", 2)],
)
def test_transformers_loads_model_and_tokenizer(tmp_path: Path, arch: str, preset: str, shards: int) -> None:
    transformers = pytest.importorskip("transformers")
    path = make_model(tmp_path / "m", preset, arch, num_shards=shards)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == ARCHS[arch]
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_pretrained(path)
    texts = [*SAMPLES, CORPUS.read_text(encoding="utf-8")[:5000]]
    for text in texts:
        ids = ours.encode(text)
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    # Our weights are what transformers uses, and the forward pass is finite.
    state = model.state_dict()
    for name, tensor in _load_all(path).items():
        assert torch.equal(state[name], tensor), name
    with torch.no_grad():
        logits = model(torch.tensor([ours.encode(SAMPLES[1])])).logits  # (1, T, V)
    assert logits.shape == (1, len(ours.encode(SAMPLES[1])), PRESETS[preset]["vocab_size"])
    assert bool(torch.isfinite(logits).all())


@pytest.mark.integration
def test_token_path_matches_transformers_generate(tmp_path: Path) -> None:
    """Our tokenizer -> HF forward -> our greedy sampler -> our detokenizer == HF generate + decode."""
    transformers = pytest.importorskip("transformers")
    from engine.detokenizer import IncrementalDetokenizer
    from engine.sampler import Sampler
    from engine.sampling_params import SamplingParams

    path = make_model(tmp_path / "m", "tiny", "llama", seed=4)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    tok = Tokenizer.from_pretrained(path)
    prompt = tok.encode("The café near the lighthouse")
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=3
        )[0, len(prompt) :].tolist()
        ids, sampler = list(prompt), Sampler()
        detok = IncrementalDetokenizer(tok, prompt)
        text = ""
        for _ in range(12):
            logits = model(torch.tensor([ids])).logits[:, -1]  # (1, V)
            out = sampler.sample(logits, [SamplingParams()], [0], [len(ids)])
            ids.append(out.token_ids[0])
            text += detok.step(out.token_ids[0])
        text += detok.flush()
    assert ids[len(prompt) :] == ref
    assert text == hf_tok.decode(ref, skip_special_tokens=True)
