"""The HTTP front door's options (no FastAPI import: configuration code builds them cheaply)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """The HTTP front door of a server (deploy/config.py's ``router.http``)."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0: the OS picks a free port
    max_request_bytes: int = 8 << 20  # a larger body: 413
    model_root: str = ""  # what /v1/models reports as the model's root (its source)
