"""Moving paged KV blocks between processes: the KVTransport seam and its UCX implementations."""
