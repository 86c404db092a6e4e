"""The router's server around a Backend: gRPC (Tandem service, standard health checking, server
reflection) and, beside it on the same event loop, the OpenAI-compatible HTTP front door
(router/http/) when ``http`` options are given. Both share one front door (router/front_door.py):
one admission queue, one backend, one telemetry.

Lifecycle::

    TandemServer(backend, ..., http=HttpOptions(...)) -> await start()  (binds both, health SERVING)
                               -> await wait()   (until stop() or termination)
                               -> await stop(grace)  idempotent:
                                    health NOT_SERVING, admission refuses new requests,
                                    in-flight streams of both front doors get `grace` seconds then
                                    are cancelled (their backend streams close, releasing their
                                    blocks), backend.close(), telemetry flushed.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import metadata
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.admission import AdmissionQueue
from router.backend import Backend
from router.front_door import FrontDoor
from router.metrics import PrometheusMetrics
from router.servicer import TandemServicer
from router.telemetry import Telemetry, setup_telemetry

if TYPE_CHECKING:
    from router.http.options import HttpOptions
    from router.http.server import HttpServer

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tandem"].full_name  # "tandem.v1.Tandem"


def _version() -> str:
    try:
        return metadata.version("tandem")
    except metadata.PackageNotFoundError:
        return "0"


class TandemServer:
    def __init__(
        self,
        backend: Backend,
        *,
        host: str = "127.0.0.1",
        port: int = 50051,
        max_concurrency: int = 64,
        max_queue: int = 256,
        telemetry: Telemetry | None = None,
        default_disaggregation: str = "never",
        routing_policy: str = "local",
        http: HttpOptions | None = None,
    ) -> None:
        self.backend = backend
        self.host = host
        self.requested_port = port
        self.port = 0
        self.admission = AdmissionQueue(max_concurrency, max_queue)
        self.telemetry = telemetry or setup_telemetry("none")
        if http is not None and self.telemetry.prometheus is None:
            # /metrics needs the Prometheus families (a backend built before saw none: it records
            # its handoffs only if its telemetry was enabled then)
            self.telemetry.prometheus = PrometheusMetrics(self.telemetry._tiers)
        self.front = FrontDoor(
            backend, self.admission, self.telemetry, default_disaggregation=default_disaggregation
        )
        self.servicer = TandemServicer(
            backend,
            self.admission,
            default_disaggregation=default_disaggregation,
            routing_policy=routing_policy,
            version=_version(),
            front_door=self.front,
        )
        self.health = health.aio.HealthServicer()
        self.http_options = http
        self.http: HttpServer | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_url(self) -> str | None:
        """``http://HOST:PORT`` of the OpenAI API once started, None without one."""
        return self.http.url if self.http is not None else None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (the OS picks one when port is 0)."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", 1024)])
        pb_grpc.add_TandemServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
        self.port = server.add_insecure_port(f"{self.host}:{self.requested_port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.host}:{self.requested_port}")
        await server.start()
        self._server = server
        if self.http_options is not None:
            try:
                await self._start_http(self.http_options)
            except BaseException:
                await server.stop(0)
                raise
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        await self.health.set(SERVICE_NAME, serving)
        return self.port

    async def _start_http(self, options: HttpOptions) -> None:
        from router.http.app import build_app
        from router.http.server import HttpServer

        self.http = HttpServer(build_app(self.front, options), options.host, options.port)
        await self.http.start()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        self.admission.close()
        stops = [self._server.stop(grace)] if self._server is not None else []
        if self.http is not None:
            stops.append(self.http.stop(grace))
        await asyncio.gather(*stops)
        # close() joins the engine thread; keep the loop free while it does.
        await asyncio.to_thread(self.backend.close)
        self.telemetry.shutdown()
        log.info("server stopped")
