"""Shared model code: checkpoint loading, the forward pass over a paged KV cache, attention kernels,
the sampler, tokenizer and detokenizer, and the continuous-batching engine that both pools run.

The base of the layout: it imports no other package of ours. The tiers below its G1 reach it through
``engine.tiers`` (a Protocol it is given); attention backends are chosen in ``attention_backends``,
apart from the ``attention`` seam; ``model_runner`` turns a scheduled batch into one forward pass.

Tensor parallelism: ``tp_layout`` (pure: which heads, KV heads, MLP columns and vocabulary rows a
rank owns), ``parallel`` (the rank group's collectives over torch.distributed, the step channel,
each rank's weight shard), ``rank_engine`` (what a rank other than 0 runs; rank 0 is an LLMEngine).
"""
