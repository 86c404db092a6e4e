"""The OpenAI HTTP API of a real ``tandem serve`` on the Ray pools (tests/e2e/conftest.py's child: one
prefill and one decode worker, KV over NIXL, the tiny checkpoint), driven by the official ``openai``
SDK: completions and chats, streamed and not, usage, stop, seed, logprobs; greedy output equals the
gRPC endpoint's and transformers', token for token; bad inputs get their codes while another stream
goes on; a client that goes away frees every KV block, as a gRPC cancel does; /metrics counts it.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import torch

from router.client import stream_generate
from tests.e2e.test_grpc_serve import ManagedServer, _server_info
from tests.helpers_checkpoints import load_reference

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

# Not test_serve_pools.py's prompts: its first test counts the KV bytes of an empty prefix cache.
PROMPTS = ["A tiny model speaks over HTTP", "Streams of tokens arrive in order"]
MAX_NEW = 8


@pytest.fixture(scope="module")
def served(served_pools: ManagedServer) -> ManagedServer:
    assert served_pools.http_url is not None
    return served_pools


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path) -> Any:
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint: Path, tokenizer: Any) -> dict[str, list[int]]:
    """transformers' greedy ids for each prompt, not stopping at EOS (as ``ignore_eos`` asks)."""
    ref = load_reference(checkpoint)
    ref.generation_config.eos_token_id = None  # (its pad id stays: pad = BOS would mask the prompt's BOS)
    out = {}
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tokenizer.encode(p)
            gen = ref.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)
            out[p] = gen[0, len(ids) :].tolist()
    return out


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> str:
    return checkpoint.name  # what tandem serve calls a checkpoint directory


def client(served: ManagedServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{served.http_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _grpc_ids(served: ManagedServer, prompt: Any, **kw: Any) -> list[int]:
    return [t for m in stream_generate(served.address, prompt, **kw) for t in m.token_ids]


def _wait_all_idle(served: ManagedServer) -> list[tuple[str, int, int, int]]:
    deadline = time.monotonic() + 20  # liveness bound only: the caller asserts the values
    while True:
        ws = [
            (w.worker_id, w.running_seqs, w.waiting_seqs, w.used_blocks)
            for w in _server_info(served.address).workers
        ]
        if all(w[1:] == (0, 0, 0) for w in ws) or time.monotonic() > deadline:
            return ws
        time.sleep(0.05)


def _metrics(served: ManagedServer) -> dict[str, float]:
    text = urllib.request.urlopen(f"{served.http_url}/metrics", timeout=30).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


IDLE = [("prefill-0", 0, 0, 0), ("decode-0", 0, 0, 0)]
GREEDY = {"temperature": 0, "max_tokens": MAX_NEW, "extra_body": {"ignore_eos": True}}


def test_greedy_completions_equal_grpc_and_transformers(
    served: ManagedServer, reference: dict[str, list[int]], tokenizer: Any, model: str, checkpoint: Path
) -> None:
    card = json.loads(urllib.request.urlopen(f"{served.http_url}/v1/models", timeout=30).read())["data"][0]
    assert (card["id"], card["root"], card["max_model_len"]) == (model, str(checkpoint), 2048)

    async def main() -> None:
        c = client(served)
        for prompt in PROMPTS:
            want = reference[prompt]
            tokens = [tokenizer.decode([t], skip_special_tokens=False) for t in want]
            assert _grpc_ids(served, prompt, max_tokens=MAX_NEW, ignore_eos=True) == want
            for mode in ("always", "never"):
                extra = {"ignore_eos": True, "disaggregation": mode}
                r = await c.completions.create(
                    model=model,
                    prompt=prompt,
                    temperature=0,
                    max_tokens=MAX_NEW,
                    logprobs=1,
                    extra_body=extra,
                )
                (choice,) = r.choices
                assert (choice.text, choice.finish_reason) == (tokenizer.decode(want), "length"), mode
                assert choice.logprobs.tokens == tokens  # token for token
                assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
                    len(tokenizer.encode(prompt)),
                    MAX_NEW,
                )
            streamed = await c.completions.create(
                model=model,
                prompt=tokenizer.encode(prompt),
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
            chunks = [ch async for ch in streamed]
            assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == tokenizer.decode(want)
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_NEW
            assert chunks[-2].choices[0].finish_reason == "length"

    asyncio.run(main())


def test_chat_stream_and_not_stop_seed_and_n(served: ManagedServer, tokenizer: Any, model: str) -> None:
    messages = [{"role": "user", "content": "Say something."}]
    grpc_chat = _grpc_ids(served, None, messages=messages, max_tokens=MAX_NEW, ignore_eos=True)

    async def main() -> None:
        c = client(served)
        r = await c.chat.completions.create(model=model, messages=messages, **GREEDY)
        text = r.choices[0].message.content
        assert (r.object, r.choices[0].message.role, text) == (
            "chat.completion",
            "assistant",
            tokenizer.decode(grpc_chat),
        )
        chunks = [
            ch
            async for ch in await c.chat.completions.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
            )
        ]
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
        assert chunks[-1].usage.completion_tokens == MAX_NEW
        assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens

        stop = text[2:5]
        cut = await c.chat.completions.create(model=model, messages=messages, stop=[stop], **GREEDY)
        assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == (
            text[: text.index(stop)],
            "stop",
        )

        sampled = {"temperature": 1.0, "max_tokens": MAX_NEW, "extra_body": {"ignore_eos": True}}
        a = await c.completions.create(model=model, prompt=PROMPTS[0], seed=42, n=2, **sampled)
        b = await c.completions.create(model=model, prompt=PROMPTS[0], seed=42, **sampled)
        assert a.choices[0].text == b.choices[0].text  # same seed, same draws
        for i, seed in ((0, 42), (1, 43)):  # choice i samples with seed + i, as gRPC does with that seed
            ids = _grpc_ids(
                served, PROMPTS[0], max_tokens=MAX_NEW, ignore_eos=True, temperature=1.0, seed=seed
            )
            assert a.choices[i].text == tokenizer.decode(ids)

    asyncio.run(main())
    assert _wait_all_idle(served) == IDLE


def test_bad_inputs_get_their_codes_while_another_stream_goes_on(served: ManagedServer, model: str) -> None:
    async def main() -> None:
        url = served.http_url
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "a long one", "max_tokens": 120, "ignore_eos": True, "stream": True}
            ongoing = await s.post(f"{url}/v1/completions", json=body)
            await ongoing.content.readuntil(b"\n\n")
            cases = [
                ({"prompt": "x", "temperature": -1}, 400, "temperature"),
                ({"prompt": [1, 10**6]}, 400, "prompt"),
                ({"prompt": "x", "max_tokens": 10**7}, 400, "max_tokens"),
                ({"prompt": "x", "model": "gpt-5"}, 404, "model"),
                ({"prompt": "x", "stop": [""]}, 400, "stop"),
            ]
            for case, status, param in cases:
                async with s.post(f"{url}/v1/completions", json=case) as r:
                    assert (r.status, (await r.json())["error"]["param"]) == (status, param), case
            with pytest.raises(openai.BadRequestError):
                await client(served).chat.completions.create(model=model, messages=[])
            text = (await ongoing.read()).decode()
            events = [json.loads(e[6:]) for e in text.split("\n\n")[:-2]]
            assert events[-1]["choices"][0]["finish_reason"] == "length" and text.endswith("data: [DONE]\n\n")
            ongoing.release()

    asyncio.run(main())
    assert _wait_all_idle(served) == IDLE


def test_a_client_that_goes_away_frees_every_block(served: ManagedServer) -> None:
    async def used_blocks() -> int:
        for _ in range(200):  # the router's load view refreshes every 0.1 s
            used = {w.worker_id: w.used_blocks for w in _server_info(served.address).workers}["decode-0"]
            if used:
                return used
            await asyncio.sleep(0.05)
        return 0

    async def main() -> list[int]:
        held = []
        body = {"prompt": "go away " * 20, "max_tokens": 1500, "ignore_eos": True}
        for stream in (True, False):
            async with aiohttp.ClientSession() as s:
                task = asyncio.ensure_future(
                    s.post(f"{served.http_url}/v1/completions", json={**body, "stream": stream})
                )
                held.append(await used_blocks())
                if stream:
                    r = await task
                    await r.content.readuntil(b"\n\n")
                    r.close()
                else:
                    task.cancel()
            assert _wait_all_idle(served) == IDLE
        return held

    assert all(n > 0 for n in asyncio.run(main()))  # each held blocks on decode-0 while it ran...
    assert _wait_all_idle(served) == IDLE  # ...and none after its client went away
    m = _metrics(served)
    assert m['tandem:kv_cache_used_blocks{role="decode",worker="decode-0"}'] == 0


def test_metrics_count_the_traffic(served: ManagedServer, model: str) -> None:
    before = _metrics(served)
    body = json.dumps({"prompt": PROMPTS[1] * 3, "max_tokens": 4, "disaggregation": "always"}).encode()
    req = urllib.request.Request(
        f"{served.http_url}/v1/completions", body, headers={"Content-Type": "application/json"}
    )
    r = urllib.request.urlopen(req, timeout=60)
    usage = json.loads(r.read())["usage"]
    after = _metrics(served)
    name = model

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta(f'tandem:prompt_tokens_total{{model_name="{name}"}}') == usage["prompt_tokens"]
    assert delta(f'tandem:generation_tokens_total{{model_name="{name}"}}') == usage["completion_tokens"]
    assert delta('tandem:disaggregation_decisions_total{decision="disaggregated",mode="always"}') == 1
    assert delta('tandem:kv_transfer_bytes_total{decode_worker="decode-0",prefill_worker="prefill-0"}') > 0
    assert delta('tandem:kv_transfer_seconds_count{decode_worker="decode-0",prefill_worker="prefill-0"}') == 1
    assert delta('tandem:prefix_cache_queries_total{worker="prefill-0"}') == usage["prompt_tokens"]
    assert after['tandem:tier_usage_perc{role="decode",tier="G1",worker="decode-0"}'] >= 0
    assert 'tandem:tier_used_blocks{role="prefill",tier="G2",worker="prefill-0"}' in after
    assert after['tandem:num_requests_running{role="prefill",worker="prefill-0"}'] == 0
