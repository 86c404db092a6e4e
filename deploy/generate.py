"""``tandem generate``: run one prompt (or a chat conversation) through the in-process engine and
stream its text. ``--chat`` sends the prompt as a user message through the model's chat template,
``--messages JSON`` a whole conversation; without ``--model`` the default model (SmolLM2) runs."""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "prompt", nargs="?", default=None, help="the prompt text (with --chat: the user's message)"
    )
    p.add_argument(
        "--model", default=None, help="smollm2 (default), demo, a checkpoint directory or a GGUF file"
    )
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    p.add_argument("--system", default=None, help="with --chat: a system message before the user's")
    p.add_argument(
        "--messages",
        default=None,
        metavar="JSON",
        help='a conversation: [{"role": "user", "content": "..."}, ...]',
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2], per output occurrence")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2], once per output token")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn-backend", default="auto", choices=["auto", "torch", "cpu", "triton"])
    p.add_argument(
        "--quantized-weights",
        default="auto",
        choices=["auto", "native", "dequantize"],
        help="GGUF / FP8 weights: kept packed and multiplied by the quantized kernels (native; auto where "
        "a kernel runs them), or dequantized at load (the reference)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--server", default=None, metavar="HOST:PORT", help="stream from a tandem serve endpoint")
    add_client_security(p)


def add_client_security(p: argparse.ArgumentParser) -> None:
    """How ``--server`` reaches a secured router (router/client.py's ``channel_security``)."""
    g = p.add_argument_group("a secured --server")
    g.add_argument(
        "--api-key-env",
        default="TANDEM_API_KEY",
        help="environment variable holding the API key (default TANDEM_API_KEY; unset: no key sent)",
    )
    g.add_argument("--api-key-file", default=None, help="file holding the API key (its first line)")
    g.add_argument("--tls", action="store_true", help="TLS with the system's CAs (implied by --tls-ca)")
    g.add_argument(
        "--tls-ca", default=None, help="CA certificate (PEM) the server's certificate is signed by"
    )
    g.add_argument("--tls-cert", default=None, help="this client's certificate (PEM), for mTLS")
    g.add_argument("--tls-key", default=None, help="this client's private key (PEM), for mTLS")


def chat_messages(args: argparse.Namespace) -> list[dict[str, str]] | None:
    """The conversation ``--chat`` / ``--system`` / ``--messages`` describe, or None for a plain
    prompt; ValueError when they do not make one."""
    if args.messages is not None:
        try:
            msgs = json.loads(args.messages)
        except json.JSONDecodeError as e:
            raise ValueError(f"--messages is not JSON: {e}") from None
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs
        ):
            raise ValueError('--messages must be a JSON list of {"role": str, "content": str}')
        if args.prompt is not None:
            msgs.append({"role": "user", "content": args.prompt})
        return msgs
    if args.prompt is None:
        raise ValueError("give a prompt (or --messages)")
    if not args.chat:
        return None
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    return [*msgs, {"role": "user", "content": args.prompt}]


def run(args: argparse.Namespace) -> int:
    try:
        args.chat_messages = chat_messages(args)
    except ValueError as e:
        print(f"tandem generate: {e}", file=sys.stderr)
        return 2
    if args.server:
        from router.client import run_client

        return run_client(args)
    from engine.chat_template import ChatTemplateError
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.model_source import DEFAULT_MODEL, resolve_model
    from engine.sampling_params import SamplingParams
    from engine.smollm2 import FetchError

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
            repetition_penalty=args.repetition_penalty,
            frequency_penalty=args.frequency_penalty,
            presence_penalty=args.presence_penalty,
        )
    except ValueError as e:
        print(f"tandem generate: {e}", file=sys.stderr)
        return 2
    try:
        model = resolve_model(args.model or DEFAULT_MODEL)
    except (FetchError, FileNotFoundError) as e:
        print(f"tandem generate: {e}", file=sys.stderr)
        return 1
    if args.model is None and not args.json:
        print(f"(model: {DEFAULT_MODEL}, {model})", file=sys.stderr)
    try:
        engine = LLMEngine(
            EngineConfig(
                model=model,
                dtype=args.dtype,
                attn_backend=args.attn_backend,
                quantized_weights=args.quantized_weights,
            )
        )
    except ValueError as e:  # a checkpoint we cannot run: the message names what
        print(f"tandem generate: {model}: {e}", file=sys.stderr)
        return 2
    try:
        t0 = time.perf_counter()
        try:
            prompt: str | list[int] = args.prompt
            if args.chat_messages is not None:
                if engine.tokenizer is None:
                    raise ValueError("this checkpoint has no tokenizer: a chat needs one")
                prompt = engine.tokenizer.encode_chat(args.chat_messages)
            engine.add_request(prompt, params, request_id="cli")
        except (ValueError, ChatTemplateError) as e:
            print(f"tandem generate: {e}", file=sys.stderr)
            return 2
        token_ids: list[int] = []
        text = ""
        reason = None
        ttft = None
        for out in engine.stream():
            if ttft is None:
                ttft = time.perf_counter() - t0
            token_ids += out.new_token_ids
            text += out.text
            if not args.json:
                sys.stdout.write(out.text)
                sys.stdout.flush()
            if out.finished:
                reason = out.finish_reason.value if out.finish_reason else None
        elapsed = time.perf_counter() - t0
        if args.json:
            print(
                json.dumps(
                    {
                        "text": text,
                        "token_ids": token_ids,
                        "finish_reason": reason,
                        "num_tokens": len(token_ids),
                        "ttft_s": round(ttft or 0.0, 4),
                        "elapsed_s": round(elapsed, 4),
                    }
                )
            )
        else:
            sys.stdout.write("\n")
            print(
                f"[{len(token_ids)} tokens, {reason}, {len(token_ids) / max(elapsed, 1e-9):.1f} tok/s]",
                file=sys.stderr,
            )
    finally:
        engine.close()
    return 0
