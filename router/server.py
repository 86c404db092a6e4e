"""The router's server around a Backend: gRPC (Tandem service, standard health checking, server
reflection) and, beside it on the same event loop, the OpenAI-compatible HTTP front door
(router/http/) when ``http`` options are given. Both share one front door (router/front_door.py):
one admission queue, one backend, one telemetry, one guard (router/security.py: API keys, rate
limits; the gRPC side's interceptor is router/interceptor.py) and one set of request limits.

Transport: TLS on both front doors when ``security.tls`` is given (mTLS with its ``client_ca_file``);
plaintext otherwise. A listener bound beyond loopback with neither API keys nor TLS logs a warning:
anyone who can reach it may use it. gRPC refuses messages over ``max_message_bytes``
(RESOURCE_EXHAUSTED), HTTP bodies over ``max_request_bytes`` (413).

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
from router.interceptor import GuardInterceptor
from router.metrics import PrometheusMetrics
from router.security import Guard, SecurityOptions, is_loopback
from router.servicer import TandemServicer
from router.telemetry import Telemetry, setup_telemetry
from router.validation import RequestLimits

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
        security: SecurityOptions | None = None,
        limits: RequestLimits | None = None,
        max_message_bytes: int = 4 << 20,
    ) -> None:
        self.backend = backend
        self.security = security or SecurityOptions()
        self.guard = Guard.from_options(self.security)  # reads the key file now: a bad one fails here
        self.max_message_bytes = max_message_bytes
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
            backend,
            self.admission,
            self.telemetry,
            default_disaggregation=default_disaggregation,
            bounds=limits or RequestLimits(),
            guard=self.guard,
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
    def tls(self) -> bool:
        return self.security.tls is not None

    def listeners(self) -> list[dict[str, object]]:
        """What this server listens on: name, address, TLS, mTLS, API keys (``tandem status``)."""
        tls = self.security.tls
        common = {
            "tls": tls is not None,
            "mtls": tls is not None and tls.client_ca_file is not None,
            "api_keys": self.guard.keys.enabled,
        }
        out: list[dict[str, object]] = [{"name": "grpc", "address": self.address, **common}]
        if self.http is not None:
            out.append({"name": "http", "address": self.http.address, "metrics": "/metrics", **common})
        return out

    @property
    def http_url(self) -> str | None:
        """``http://HOST:PORT`` of the OpenAI API once started, None without one."""
        return self.http.url if self.http is not None else None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (the OS picks one when port is 0)."""
        options = [
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", 1024),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        interceptors = [] if self.guard.open else [GuardInterceptor(self.guard)]
        server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_TandemServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
        target = f"{self.host}:{self.requested_port}"
        if self.security.tls is not None:
            cert, key, client_ca = self.security.tls.read()
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
            )
            self.port = server.add_secure_port(target, creds)
        else:
            self.port = server.add_insecure_port(target)
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
        self._warn_if_open()
        return self.port

    def _warn_if_open(self) -> None:
        hosts = [self.host] + ([self.http.host] if self.http is not None else [])
        exposed = [h for h in hosts if not is_loopback(h)]
        if exposed and not self.guard.keys.enabled and self.security.tls is None:
            log.warning(
                "SECURITY: listening on %s beyond loopback with no API keys and no TLS: anyone who "
                "can reach it may generate; set router.security (api_keys_file / api_keys_env, tls)",
                ", ".join(sorted(set(exposed))),
            )

    async def _start_http(self, options: HttpOptions) -> None:
        from router.http.app import build_app
        from router.http.server import HttpServer

        self.http = HttpServer(build_app(self.front, options), options.host, options.port, self.security.tls)
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
        await self.guard.close()
        self.telemetry.shutdown()
        log.info("server stopped")
