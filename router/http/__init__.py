"""The OpenAI-compatible HTTP front door, served beside gRPC by the same router process.

- ``app``: :func:`build_app` (FastAPI) over router/front_door.py, the one place the app is put
  together (routes, error handlers, the ASGI edge; where auth / TLS middleware goes)
- ``generation``: one completions / chat completions request: its choices, JSON or SSE events
- ``openai``: OpenAI's request and response shapes <-> Tandem's (pure)
- ``schemas``: the request bodies as pydantic models; ``errors``: statuses and OpenAI error objects
- ``options``: HttpOptions (host, port, body limit), importable without FastAPI
- ``server``: uvicorn on the running event loop (start, stop with a grace period)

Only this package imports FastAPI, Starlette, uvicorn or pydantic in the router
(tests/unit/test_layout.py).
"""
