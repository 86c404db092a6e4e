"""Prefill workers: run prompts in chunks and stream each layer's KV to a decode worker."""
