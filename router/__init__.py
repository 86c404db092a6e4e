"""The front door: the gRPC Generate endpoint, request validation, routing, and the coordinator that
drives one request through both pools.

- ``server`` / ``servicer`` / ``validation`` / ``errors`` / ``admission``: gRPC, checks, status codes
- ``backend``: the Backend seam the servicer calls; ``engine_backend`` (one in-process engine) and
  ``pools_backend`` (the Ray pools, routed per request) implement it
- ``coordinator``: Pools, one request's path through a prefill and a decode worker (pure asyncio)
- ``routing`` / ``policies`` / ``cost_model`` / ``topology``: which workers serve a request (pure)
- ``telemetry``: the router's tracer and metrics; ``client``: a gRPC client

It knows no Ray and no YAML: the pools and the configuration are built by deploy/.
"""
