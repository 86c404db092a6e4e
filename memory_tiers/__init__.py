"""The tiered KV block store: G1 device, G2 host, G3 disk, keyed by the chained block hash.

Modules (import the one you need; this package imports nothing, so the router can use
``memory_tiers.metadata`` without torch; ``tandem tier-bench`` lives in benchmarks/):

- ``tier_store``     TierStore / TierConfig: offload, lookup, onboard, pin, host reservations
- ``engine_tiers``   EngineTiers: the ``tiers`` an LLMEngine is given (engine/tiers.py's seam)
- ``device_pool``    DevicePool seam over the engine's G1 KV tensor (G1 accounting is BlockManager's)
- ``host_tier``      G2 memory (page-aligned or pinned host tensor)
- ``slot_index``     exact G2 slot accounting, pure Python
- ``disk_tier``      G3: block files, LRU index rebuilt at start-up, byte capacity
- ``disk_format``    G3 file format: checksummed header page, atomic write, verified read
- ``metadata``       MetadataStore Protocol, Tier, BlockEvent, WorkerInfo, in-process store
- ``redis_metadata`` RedisMetadataStore
- ``metrics``        TierMetrics snapshot
"""
