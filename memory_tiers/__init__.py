"""The tiered KV block store: G1 device, G2 host, G3 disk, keyed by the chained block hash."""
