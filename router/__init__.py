"""The front doors: the gRPC Generate endpoint and the OpenAI-compatible HTTP API beside it, request
validation, routing, and the coordinator that drives one request through both pools.

- ``front_door``: what both front doors share (checks, tokenizing, admission, the backend stream,
  telemetry); ``server``: the gRPC server and, on the same event loop, the HTTP one
- ``servicer`` / ``validation`` / ``errors`` / ``admission``: gRPC, checks, status codes
- ``http/``: the OpenAI API (FastAPI app, request schemas, SSE streams, OpenAI error objects)
- ``backend``: the Backend seam the servicer calls; ``engine_backend`` (one in-process engine) and
  ``pools_backend`` (the Ray pools, routed per request) implement it
- ``coordinator``: Pools, one request's path through a prefill and a decode worker (pure asyncio)
- ``routing`` / ``policies`` / ``cost_model`` / ``topology``: which workers serve a request (pure)
- ``telemetry``: the router's tracer and metrics; ``metrics``: their Prometheus ``tandem:`` families
  (GET /metrics); ``client``: a gRPC client

It knows no Ray and no YAML: the pools and the configuration are built by deploy/.
"""
