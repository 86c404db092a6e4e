"""uvicorn serving the HTTP app on the running event loop, beside the gRPC server.

Lifecycle::

    HttpServer(app, host, port, tls) -> await start()       binds (port 0: the OS picks one), serves
                                -> await stop(grace)    idempotent: stops accepting, closes idle
                                                        connections, gives in-flight requests
                                                        ``grace`` seconds, then cancels them

uvicorn's ``serve()`` would install its own SIGINT / SIGTERM handlers; this runs its startup, main
loop and shutdown steps instead, so the process's owner (``tandem serve``, the launched router's
thread) keeps the signals and stops both front doors together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

if TYPE_CHECKING:
    from router.security import TlsFiles

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000, tls: TlsFiles | None = None
    ) -> None:
        self.app = app
        self.tls = tls
        self.host = host
        self.requested_port = port
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.address}"

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.requested_port), family=family, backlog=2048)
        sock.setblocking(False)
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            ws="none",
            access_log=False,
            log_level="warning",
            server_header=False,
            timeout_keep_alive=30,
            ssl_certfile=self.tls.cert_file if self.tls is not None else None,
            ssl_keyfile=self.tls.key_file if self.tls is not None else None,
            # a client CA: mTLS, a client certificate it signed is required
            ssl_ca_certs=self.tls.client_ca_file if self.tls is not None else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED
            if self.tls is not None and self.tls.client_ca_file
            else ssl.CERT_NONE,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)  # what serve() sets up before startup()
        await server.startup(sockets=[sock])
        self._server = server
        self._loop_task = asyncio.create_task(server.main_loop(), name="tandem-http")
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        if self._stopped or self._server is None:
            self._stopped = True
            return
        self._stopped = True
        server = self._server
        server.config.timeout_graceful_shutdown = max(grace, 0.01)  # type: ignore[assignment]
        server.should_exit = True
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        await server.shutdown(sockets=[self._socket] if self._socket is not None else None)
        log.info("http server stopped")
