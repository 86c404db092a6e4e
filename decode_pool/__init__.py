"""Decode workers: reserve KV for incoming handoffs and generate with continuous batching."""
