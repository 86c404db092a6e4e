"""``tandem serve``: load the configuration, build the backend, run the router until a signal: gRPC
and, beside it in the same process, the OpenAI-compatible HTTP API (router/http/).

With no arguments: the embedded default (``deploy.config.default_config``): a local Ray cluster, one
prefill and one decode worker (Ray actors, KV over NIXL), SmolLM2-135M-Instruct, in-process metadata,
gRPC on 127.0.0.1:50051 and HTTP on 127.0.0.1:8000 (``--http-port``, ``--no-http``). ``--backend
pools``: deploy/pools.py builds the workers, router/pools_backend.py routes over them, cache- and
fabric-aware. Both front doors share the backend, the admission limits and the cancel path.
``--backend engine`` serves from one in-process engine instead (no Ray). ``--ray-address`` (or
``RAY_ADDRESS``) joins a running Ray cluster instead of starting one. SIGINT / SIGTERM stop
gracefully: stop accepting, give in-flight streams ``--grace`` seconds, cancel the rest, close the
backend (which stops the workers and the Ray cluster it started).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("tandem.serve")
BACKENDS = ("pools", "engine")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="deployment YAML (default: the embedded one)")
    p.add_argument(
        "--model",
        default=None,
        help="smollm2 (default), demo, a checkpoint directory or a GGUF file (overrides the config's model)",
    )
    p.add_argument("--host", default=None, help="address to bind (default: router.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: router.port, 50051; 0 = any free)")
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="port of the OpenAI-compatible HTTP API (default: router.http.port, 8000; 0 = any free)",
    )
    p.add_argument("--no-http", action="store_true", help="serve gRPC only (router.http.enabled: false)")
    p.add_argument("--disaggregation", choices=["auto", "always", "never"], default=None)
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at once")
    p.add_argument("--max-queue", type=int, default=None, help="requests waiting; beyond: RESOURCE_EXHAUSTED")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="pools",
        help="pools: Ray prefill/decode workers, routed per request; engine: one in-process engine",
    )
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--tracing", choices=["none", "console", "otlp"], default=None)
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight streams get at shutdown")
    p.add_argument("--log-level", default="INFO")
    sec = p.add_argument_group("security (router.security; see README's Security section)")
    sec.add_argument("--api-key-file", type=Path, default=None, help="accepted API keys, one per line")
    sec.add_argument(
        "--api-key-env", default=None, help="environment variable holding API keys (comma-separated)"
    )
    sec.add_argument(
        "--tls-cert", type=Path, default=None, help="server certificate chain (PEM), both front doors"
    )
    sec.add_argument("--tls-key", type=Path, default=None, help="the certificate's private key (PEM)")
    sec.add_argument(
        "--tls-client-ca", type=Path, default=None, help="require client certificates signed by this CA"
    )


def resolve_config(args: argparse.Namespace) -> Any:
    """The deployment configuration with the command line's overrides applied (validated again)."""
    from deploy.config import TandemConfig, default_config, load_config

    cfg = load_config(args.config) if args.config else default_config()
    data = cfg.model_dump()
    if args.model:
        data["model"] = args.model
    overrides = {
        "host": args.host,
        "port": args.port,
        "disaggregation": args.disaggregation,
        "max_concurrency": args.max_concurrency,
        "max_queue": args.max_queue,
    }
    data["router"].update({k: v for k, v in overrides.items() if v is not None})
    if args.tracing:
        data["router"]["tracing"]["exporter"] = args.tracing
    if args.http_port is not None:
        data["router"]["http"]["port"] = args.http_port
    if args.no_http:
        data["router"]["http"]["enabled"] = False
    sec = data["router"]["security"]
    if getattr(args, "api_key_file", None) is not None:
        sec["api_keys_file"] = args.api_key_file
    if getattr(args, "api_key_env", None):
        sec["api_keys_env"] = args.api_key_env
    cert, key, ca = (getattr(args, n, None) for n in ("tls_cert", "tls_key", "tls_client_ca"))
    if cert is not None or key is not None:
        if cert is None or key is None:
            raise ValueError("--tls-cert and --tls-key go together")
        sec["tls"] = {"cert_file": cert, "key_file": key, "client_ca_file": ca}
    elif ca is not None:
        if sec.get("tls") is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (or router.security.tls)")
        sec["tls"]["client_ca_file"] = ca
    return TandemConfig.model_validate(data)


def build_engine_backend(cfg: Any) -> Any:
    from deploy.derive import engine_config, model_dir, model_name
    from router.engine_backend import EngineBackend

    path, name = model_dir(cfg), model_name(cfg)
    log.info("loading model %s from %s", name, path)
    return EngineBackend(
        engine_config(cfg, model=path), model_name=name, max_tokens_limit=cfg.router.max_tokens_limit
    )


def build_pools_backend(cfg: Any, ray_address: str | None, telemetry: Any) -> Any:
    from deploy.pools import serve_backend

    return serve_backend(cfg, ray_address, telemetry)


async def serve(
    cfg: Any, backend_name: str = "pools", grace: float = 5.0, ray_address: str | None = None
) -> int:
    from deploy.derive import server_options
    from router.server import TandemServer
    from router.telemetry import setup_telemetry

    rc = cfg.router
    # /metrics is the HTTP front door's: its Prometheus families exist when it does
    telemetry = setup_telemetry(rc.tracing.exporter, rc.tracing.otlp_endpoint, prometheus=rc.http.enabled)
    if backend_name == "engine":
        backend = build_engine_backend(cfg)
    else:
        backend = build_pools_backend(cfg, ray_address or os.environ.get("RAY_ADDRESS"), telemetry)
        try:
            await backend.start()
        except BaseException:
            backend.close()
            raise
    policy = "local" if backend_name == "engine" else None
    try:
        server = TandemServer(
            backend, telemetry=telemetry, **server_options(rc, policy, cfg.model, cfg.metadata)
        )
        await server.start()
    except BaseException:
        backend.close()
        raise
    addr = server.address
    log.info("listening on %s (backend %s, model %s)", addr, backend_name, backend.model_info().limits.name)
    log.info('query it:  tandem generate --chat "What is the capital of France?" --server %s', addr)
    log.info('           tandem generate "Once upon a time" --server %s', addr)
    if not server.tls:
        log.info('           grpcurl -plaintext -d \'{"text": "Hello"}\' %s tandem.v1.Tandem/Generate', addr)
    if server.http_url is not None:
        url, name = server.http_url, backend.model_info().limits.name
        log.info("OpenAI-compatible HTTP on %s (/v1/completions, /v1/chat/completions, /metrics)", url)
        log.info(
            "query it:  curl %s/v1/chat/completions -H 'Content-Type: application/json' -d "
            '\'{"model": "%s", "messages": [{"role": "user", "content": "Hello!"}]}\'',
            url,
            name,
        )
    if backend_name == "engine" and rc.disaggregation != "never":
        log.info("disaggregation %r: the engine backend serves everything in-process", rc.disaggregation)

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    waiter = asyncio.create_task(server.wait())
    stopper = asyncio.create_task(stopping.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down (grace %.1f s)", grace)
    await server.stop(grace)
    for t in (waiter, stopper):
        t.cancel()
    return 0


def run(args: argparse.Namespace) -> int:
    from deploy.config import ConfigError

    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=fmt, stream=sys.stderr)
    try:
        cfg = resolve_config(args)
        from deploy.derive import check_security

        check_security(cfg)  # keys, TLS files, the Redis password: before any model loads
        if args.backend == "pools":  # every pool's tensor_parallel_size against the model's heads
            from deploy.derive import check_model, model_dir

            check_model(cfg, model_dir(cfg))
    except (ConfigError, ValueError) as e:
        print(f"tandem serve: {e}", file=sys.stderr)
        return 2
    from engine.smollm2 import FetchError

    try:
        return asyncio.run(serve(cfg, args.backend, args.grace, args.ray_address))
    except (FetchError, FileNotFoundError) as e:  # the model cannot be had: say why, no traceback
        print(f"tandem serve: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem serve", description="serve Tandem over gRPC")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
