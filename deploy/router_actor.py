"""The launched router: a detached Ray actor that hosts the gRPC server (and, beside it, the OpenAI
HTTP API when ``router.http`` is enabled) over the named pool workers.

``tandem launch`` (deploy/cluster.py) creates it as the named actor ``router`` in the Tandem
namespace, pinned to the head node, after the workers. Its constructor looks the workers up by name
and builds the router's backend over them as ``tandem serve`` does (deploy/pools.py's
``pools_backend``: the same topology rule, store and limits), then starts a
:class:`router.server.TandemServer` on an event loop in a thread of its own, so the actor's methods
(``address``, ``info``, ``topology``, ``drain``) answer while requests stream. Being detached, it outlives the
``tandem launch`` process; Ray restarts it (constructor arguments kept) if its process dies.

``drain(grace)`` is ``tandem stop``'s first step: stop accepting, give in-flight streams ``grace``
seconds, cancel the rest (their clients see CANCELLED / UNAVAILABLE, never a silent truncation).
The backend's close does not kill the workers: they belong to the launch, not to this router.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import ray

log = logging.getLogger("tandem.router_actor")
START_TIMEOUT_S = 300.0


class RouterActor:
    """Hosts the gRPC router; ``cfg_json`` is the validated TandemConfig as JSON."""

    def __init__(
        self, cfg_json: str, prefill: list[str], decode: list[str], namespace: str, digest: str
    ) -> None:
        from deploy.config import TandemConfig

        self.cfg = TandemConfig.model_validate_json(cfg_json)
        self._names = (list(prefill), list(decode))
        self._namespace = namespace
        self._digest = digest
        self._address = ""
        self._http_url = ""
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._server: Any = None
        self._topology: Any = None
        self._grace = 5.0
        self._thread = threading.Thread(target=self._run, name="tandem-router", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise TimeoutError(f"the router did not start within {START_TIMEOUT_S:.0f} s")
        if self._error is not None:
            raise RuntimeError(f"the router failed to start: {self._error!r}") from self._error

    # -- methods tandem launch / status / stop call -------------------------------------------------
    def address(self) -> str:
        return self._address

    def http_url(self) -> str:
        """``http://HOST:PORT`` of the OpenAI API, "" when ``router.http`` is disabled."""
        return self._http_url

    def digest(self) -> str:
        return self._digest

    def info(self) -> dict[str, Any]:
        s = self._server
        return {
            "address": self._address,
            "http_url": self._http_url,
            "node_id": ray.get_runtime_context().get_node_id(),
            "in_flight": s.admission.in_flight if s is not None else 0,
            "policy": self.cfg.router.policy,
            "serving": self._thread.is_alive() and self._error is None,
            "listeners": s.listeners() if s is not None else [],
        }

    def topology(self) -> dict[str, Any]:
        """The topology this router prices handoffs with (deploy/pools.py's ``describe``)."""
        from deploy.pools import describe

        return describe(self._topology) if self._topology is not None else {}

    def drain(self, grace: float = 5.0) -> bool:
        """Stop serving: in-flight streams get ``grace`` seconds, then are cancelled. True once stopped."""
        self._grace = grace
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(grace + 30.0)
        return not self._thread.is_alive()

    # -- the server's thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001  (reported to the constructor, or logged)
            self._error = e
            log.exception("router stopped with an error")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        from deploy.derive import server_options
        from router.server import TandemServer
        from router.telemetry import setup_telemetry

        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        rc = self.cfg.router
        telemetry = setup_telemetry(rc.tracing.exporter, rc.tracing.otlp_endpoint, prometheus=rc.http.enabled)
        backend = await asyncio.to_thread(self._backend, telemetry)
        await backend.start()
        server = TandemServer(
            backend,
            telemetry=telemetry,
            **server_options(rc, model_root=self.cfg.model, metadata=self.cfg.metadata),
        )
        try:
            await server.start()
        except BaseException:
            backend.close()
            raise
        self._server = server
        reachable = lambda h: h if h not in ("0.0.0.0", "::", "") else ray.util.get_node_ip_address()  # noqa: E731
        self._address = f"{reachable(rc.host)}:{server.port}"
        if server.http is not None:
            scheme = "https" if server.tls else "http"
            self._http_url = f"{scheme}://{reachable(server.http.host)}:{server.http.port}"
        log.info("router serving on %s (HTTP: %s)", self._address, self._http_url or "off")
        self._ready.set()
        await self._stopping.wait()
        await server.stop(self._grace)

    def _backend(self, telemetry: Any) -> Any:
        from deploy.pools import named_pools, pools_backend

        prefill, decode = named_pools(*self._names, self._namespace)
        backend = pools_backend(self.cfg, prefill, decode, telemetry=telemetry)
        self._topology = backend.router.topology
        return backend
