"""What both pools share, so that neither imports the other (and the router imports neither).

- ``handoff``          the handoff's messages (WorkRequest, KVGrant, FirstToken, TokenChunk) and the
                       errors a pool call ends with; pure data
- ``reports``          what a worker reports: WorkerLoad (the one load type), TierUsage; pure data
- ``config``           WorkerConfig: one worker's EngineConfig + TierConfig + KV transport
- ``build``            what every worker builds from it: engine with its tiers, transport, EvictionLog
- ``actors``           Ray glue: PoolSpec, actor options, calls that turn a dead actor into WorkerDied,
                       the identity every worker actor answers (node name: the one topology rule)
- ``actor_telemetry``  the worker actors' tracer and tier reports (a mixin)
- ``tracing``          the trace context every Ray call carries; a worker's tracer
- ``rank_group``       a tensor-parallel worker's messages, and rank 0's handle on its other ranks
- ``rank_follower``    a rank other than 0: its shard, KV pool and transport, executing rank 0's steps
- ``tp_handoff``       one rank's side of a handoff: the heads it sends, to which decode rank
- ``tp_actors``        Ray: a TP worker's placement group (STRICT_PACK) and its follower actors

It imports engine, kv_transfer and memory_tiers only; prefill_pool, decode_pool and router build on it.
"""
