"""Shared model code: checkpoint loading, the forward pass over a paged KV cache, attention kernels,
the sampler, tokenizer and detokenizer, and the continuous-batching engine that both pools run.

The base of the layout: it imports no other package of ours. The tiers below its G1 reach it through
``engine.tiers`` (a Protocol it is given); attention backends are chosen in ``attention_backends``,
apart from the ``attention`` seam; ``model_runner`` turns a scheduled batch into one forward pass.
"""
