"""The gRPC client of ``tandem generate --server HOST:PORT``: build a request, stream the reply.

``stream_generate`` yields the server's GenerateResponse messages as they arrive (sync gRPC; the
channel closes when the iterator is exhausted or closed, which cancels the call on the server).
``run_client(args)`` is what ``deploy/generate.py`` calls when ``--server`` is given: it reads
the same argparse fields (prompt, max_tokens, temperature, top_p, top_k, seed, ignore_eos, json,
server) and streams text to stdout, or prints one JSON object with ``--json``.

A secured server (router/security.py): :class:`ClientSecurity` carries the API key (sent as
``authorization: Bearer KEY`` metadata) and the TLS files (the CA to verify the server with; a
client certificate and key for mTLS). ``--api-key-env`` / ``--api-key-file`` / ``--tls-ca`` /
``--tls-cert`` / ``--tls-key`` fill it; the key never goes on the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc

_FINISH_NAMES: dict[int, str | None] = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_ERROR: "error",
}
_DISAGG = {
    None: pb.DISAGGREGATION_UNSPECIFIED,
    "auto": pb.DISAGGREGATION_AUTO,
    "always": pb.DISAGGREGATION_ALWAYS,
    "never": pb.DISAGGREGATION_NEVER,
}


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    api_key: str | None = field(default=None, repr=False)  # never printed
    tls: bool = False  # True: TLS (the system's CAs unless ca_file)
    ca_file: str | None = None
    cert_file: str | None = None  # this client's certificate, for mTLS
    key_file: str | None = None

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else []

    def channel(self, address: str) -> grpc.Channel:
        if not (self.tls or self.ca_file or self.cert_file):
            return grpc.insecure_channel(address)
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))
        return grpc.secure_channel(address, creds)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClientSecurity:
        g = lambda name: getattr(args, name, None)  # noqa: E731
        key = None
        key_file: str | None = g("api_key_file")
        key_env: str | None = g("api_key_env")
        if key_file:
            key = Path(key_file).read_text().strip().splitlines()[0].strip()
        elif key_env:
            key = os.environ.get(key_env) or None
        return cls(key, bool(g("tls")), g("tls_ca"), g("tls_cert"), g("tls_key"))


def build_request(
    prompt: str | Sequence[int] | None = None,
    *,
    messages: Sequence[Mapping[str, str]] | None = None,
    add_generation_prompt: bool | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    ignore_eos: bool = False,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    logprobs: int | None = None,
    repetition_penalty: float | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    model: str = "",
    request_id: str = "",
    disaggregation: str | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest for a prompt (text or token ids) or a chat (``messages``: role/content
    dicts); ``None`` leaves an optional field unset (the server's default applies)."""
    sampling = pb.SamplingParams(
        temperature=temperature,
        top_k=top_k,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
    )
    if repetition_penalty is not None:
        sampling.repetition_penalty = repetition_penalty
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    if logprobs is not None:
        sampling.logprobs = logprobs
    req = pb.GenerateRequest(
        model=model, sampling=sampling, request_id=request_id, disaggregation=_DISAGG[disaggregation]
    )
    if messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
        if add_generation_prompt is not None:
            req.chat.add_generation_prompt = add_generation_prompt
    elif isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.ids.extend(prompt)
    return req


def stream_generate(
    address: str,
    prompt: str | Sequence[int] | None = None,
    *,
    timeout: float | None = None,
    security: ClientSecurity | None = None,
    **params: Any,
) -> Iterator[pb.GenerateResponse]:
    """Stream one Generate call's responses; ``params`` are :func:`build_request`'s keywords.
    Raises ``grpc.RpcError`` with the server's status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
    UNAUTHENTICATED, ...)."""
    sec = security or ClientSecurity()
    with sec.channel(address) as channel:
        stub = pb_grpc.TandemStub(channel)
        call = stub.Generate(build_request(prompt, **params), timeout=timeout, metadata=sec.metadata)
        try:
            yield from call
        finally:
            call.cancel()  # no-op when finished; frees the server's request when the caller stops early


def finish_name(reason: int) -> str | None:
    return _FINISH_NAMES.get(reason, "error")


def run_client(args: argparse.Namespace) -> int:
    """``tandem generate PROMPT --server HOST:PORT [--json]``; returns the exit status."""
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731  (args from several parsers)
    t0 = time.perf_counter()
    token_ids: list[int] = []
    text: list[str] = []
    ttft: float | None = None
    last: pb.GenerateResponse | None = None
    try:
        chat = g("chat_messages")
        for msg in stream_generate(
            args.server,
            None if chat is not None else args.prompt,
            messages=chat,
            max_tokens=g("max_tokens"),
            temperature=g("temperature", 0.0) or 0.0,
            top_p=g("top_p"),
            top_k=g("top_k", 0) or 0,
            seed=g("seed"),
            ignore_eos=bool(g("ignore_eos", False)),
            repetition_penalty=g("repetition_penalty"),
            frequency_penalty=g("frequency_penalty", 0.0) or 0.0,
            presence_penalty=g("presence_penalty", 0.0) or 0.0,
            timeout=g("timeout"),
            security=ClientSecurity.from_args(args),
        ):
            if ttft is None:
                ttft = time.perf_counter() - t0
            token_ids += msg.token_ids
            text.append(msg.text)
            if not g("json"):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
            last = msg
    except grpc.RpcError as e:
        code = e.code()
        print(f"tandem generate: {args.server}: {code.name}: {e.details()}", file=sys.stderr)
        return 2 if code == grpc.StatusCode.INVALID_ARGUMENT else 1
    elapsed = time.perf_counter() - t0
    reason = finish_name(last.finish_reason) if last is not None else None
    if g("json"):
        out: dict[str, Any] = {
            "text": "".join(text),
            "token_ids": token_ids,
            "finish_reason": reason,
            "num_tokens": len(token_ids),
            "ttft_s": round(ttft or 0.0, 4),
            "elapsed_s": round(elapsed, 4),
        }
        if last is not None:
            out["request_id"] = last.request_id
            out["usage"] = {
                "prompt_tokens": last.usage.prompt_tokens,
                "completion_tokens": last.usage.completion_tokens,
                "cached_tokens": last.usage.cached_tokens,
            }
            t = last.timings
            out["timings"] = {
                "queue_time_s": t.queue_time_s,
                "time_to_first_token_s": t.time_to_first_token_s,
                "total_time_s": t.total_time_s,
                "backend_time_s": t.backend_time_s,
                "prefill_worker": t.prefill_worker,
                "decode_worker": t.decode_worker,
                "kv_bytes_moved": t.kv_bytes_moved,
                "disaggregated": t.disaggregated,
            }
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        rate = len(token_ids) / max(elapsed, 1e-9)
        print(f"[{len(token_ids)} tokens, {reason}, {rate:.1f} tok/s via {args.server}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone ``python -m router.client PROMPT --server HOST:PORT`` (same flags as the CLI)."""
    p = argparse.ArgumentParser(prog="tandem generate --server")
    p.add_argument("prompt")
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--api-key-env", default="TANDEM_API_KEY")
    p.add_argument("--api-key-file", default=None)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--tls-ca", default=None)
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    return run_client(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
