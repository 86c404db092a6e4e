"""Shared model code: checkpoint loading, the forward pass over a paged KV cache, attention
kernels, the sampler, tokenizer and detokenizer, and the continuous-batching engine that both
pools run."""
