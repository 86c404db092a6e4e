"""The composition root: the deployment's configuration, everything derived from it, building the Ray
pools, and the ``tandem`` commands. The only package that imports all the others.

- ``config``        TandemConfig: the pydantic schema of the YAML, its loader and the default
- ``derive``        TandemConfig -> EngineConfig, TierConfig, WorkerConfig, PoolSpec, server options
- ``pools``         the Ray pools from a TandemConfig (serve, launch and the launched router alike),
                    the router's backend over them, the one topology rule
- ``cluster``       ``tandem launch`` / ``stop`` / ``status`` on a running cluster: named, detached actors
- ``router_actor``  the launched router: a Ray actor hosting the gRPC server
- ``cli``           the ``tandem`` dispatcher; ``serve``, ``generate``, ``make_model``, ``launch``,
                    ``status``, ``stop``: one module per command (benchmarks live in benchmarks/)
"""
