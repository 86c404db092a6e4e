"""The launched router: a detached Ray actor that hosts the gRPC server over the named pool workers.

``tandem launch`` (deploy/cluster.py) creates it as the named actor ``router`` in the Tandem
namespace, pinned to the head node, after the workers. Its constructor looks the workers up by name,
builds a :class:`router.pools_backend.PoolsBackend` over them and starts a
:class:`router.server.TandemServer` on an event loop in a thread of its own, so the actor's methods
(``address``, ``info``, ``drain``) answer while requests stream. Being detached, it outlives the
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
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._server: Any = None
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

    def digest(self) -> str:
        return self._digest

    def info(self) -> dict[str, Any]:
        s = self._server
        return {
            "address": self._address,
            "node_id": ray.get_runtime_context().get_node_id(),
            "in_flight": s.admission.in_flight if s is not None else 0,
            "policy": self.cfg.router.policy,
            "serving": self._thread.is_alive() and self._error is None,
        }

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
        from router.server import TandemServer
        from router.telemetry import setup_telemetry

        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        rc = self.cfg.router
        telemetry = setup_telemetry(rc.tracing.exporter, rc.tracing.otlp_endpoint)
        backend = await asyncio.to_thread(self._backend, telemetry)
        await backend.start()
        server = TandemServer.from_config(backend, rc, telemetry)
        try:
            await server.start()
        except BaseException:
            backend.close()
            raise
        self._server = server
        host = rc.host if rc.host not in ("0.0.0.0", "::", "") else ray.util.get_node_ip_address()
        self._address = f"{host}:{server.port}"
        log.info("router serving on %s", self._address)
        self._ready.set()
        await self._stopping.wait()
        await server.stop(self._grace)

    def _backend(self, telemetry: Any) -> Any:
        from decode_pool.coordinator import Pools
        from decode_pool.pool import RayDecodeHandle
        from engine.model_source import model_name, resolve_model
        from prefill_pool.pool import RayPrefillHandle
        from router.pools_backend import PoolsBackend, make_store
        from router.topology import Placement, Topology

        cfg = self.cfg
        prefill_names, decode_names = self._names
        prefill = [RayPrefillHandle(ray.get_actor(n, namespace=self._namespace), n) for n in prefill_names]
        decode = [RayDecodeHandle(ray.get_actor(n, namespace=self._namespace), n) for n in decode_names]
        handles: list[Any] = [*prefill, *decode]
        names = ray.get([h.actor.node_name.remote() for h in handles])
        nodes = {h.worker_id: n for h, n in zip(handles, names, strict=True)}
        topo = cfg.topology

        def place(node: str) -> Placement:
            t = topo.nodes.get(node)
            return Placement(
                node=node, nvlink_domain=t.nvlink_domain if t else None, rack=t.rack if t else None
            )

        topology = Topology.build(
            {w: place(n) for w, n in nodes.items()},
            link_gbps=dict(topo.link_gbps),
            calibration_file=topo.calibration_file,
            same_node_link=topo.same_node_link,
        )
        model_dir = resolve_model(cfg.model)
        return PoolsBackend.over_pools(
            Pools(prefill, decode, disaggregation="auto" if prefill else "never"),
            model_dir,
            make_store(cfg.metadata.store),
            name=model_name(cfg.model),
            dtype=cfg.dtype,
            block_size=cfg.engine.block_size,
            policy=cfg.router.policy,
            topology=topology,
            nodes=nodes,
            max_model_len=cfg.engine.max_model_len,
            max_tokens_limit=cfg.router.max_tokens_limit,
            heartbeat_interval_s=cfg.metadata.heartbeat_interval_s,
            heartbeat_ttl_s=cfg.metadata.heartbeat_ttl_s,
            telemetry=telemetry,
        )
