"""The in-process engine: continuous batching of many requests over one model and one paged KV pool.

One ``step()``::

    scheduler.schedule()      -> which sequences run, how many new tokens each (a token budget)
    ModelRunner.execute()     -> one forward pass over the flat batch (prefill chunks + decodes),
                                 logits only for sequences whose chunk reaches their last token
                                 (engine/model_runner.py; ``step(on_layer=...)`` hooks each layer)
    scheduler.update()        -> computed-token counts advance, full blocks enter the prefix cache
    sample, detokenize, stop  -> new tokens appended; finished sequences release their blocks

A new request's prefix found below G1 is onboarded first (engine/tier_onboarding.py), through the
G2/G3 tiers the engine was given (engine/tiers.py: a Protocol; the engine never builds a store).

Lifecycle: construct (loads weights, allocates the KV pool) -> ``add_request`` / ``step`` (or
``generate``) -> ``close`` (idempotent; aborts what is left so every block is returned).

Tensor parallel (``tp``, engine/parallel.py): this engine is rank 0; it loads its shard and its
heads' KV pool, schedules and samples for the whole group, and hands every step's inputs to
``runner.publish`` so that the other ranks (engine/rank_engine.py) run the same step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

from engine.block_manager import BlockManager
from engine.config import ModelConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_layout import KVLayout
from engine.model import Model, load_model
from engine.model_runner import ModelRunner
from engine.parallel import TPGroup
from engine.sampler import SampleOutput, Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import FinishReason, Sequence, SequenceStatus
from engine.step_cost import StepCostModel
from engine.tier_onboarding import TierOnboarder
from engine.tiers import LowerTiers, TiersFactory
from engine.tokenizer import Tokenizer
from engine.tp_layout import Parallelism

# Given one step's batch, the callback to run after each layer's K/V are written (None: no callback).
LayerHook = Callable[[SchedulerOutput], Callable[[int], None] | None]


@dataclass(slots=True)
class EngineConfig:
    model: str | Path
    dtype: str = "float32"
    attn_backend: str = "auto"  # auto: the C decode kernel on CPU, Triton on GPU
    linear_backend: str = "auto"  # auto: the C kernel (else oneDNN) for fp32 on CPU, else F.linear
    quantized_weights: str = "auto"  # native | dequantize | auto: GGUF / FP8 weights (engine/quant/method.py)
    kv_cache_dtype: str = "auto"  # auto (the run dtype) | fp8_e4m3 | int8 (engine/kv_quant.py)
    device: str = "cpu"
    block_size: int = 16
    num_blocks: int | None = None  # None: from kv_cache_bytes, capped at what max_num_seqs can use
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # A bounded iteration: a step's predicted time (engine/step_cost.py) stays within this, prefill
    # chunks shrinking to fit (engine/scheduler.py); None: the token budget alone.
    max_step_time_s: float | None = None
    min_prefill_tokens: int = 16
    # Text and stop strings here (RequestOutput.text); False: token ids only, the caller makes the
    # text (a server's front door does, once per request: router/front_door.py).
    detokenize: bool = True
    # A worker of several ranks (engine/tp_layout.Parallelism): attention and dense MLPs over
    # ``tensor_parallel_size`` of them (0: all), routed experts over ``expert_parallel_size``.
    tensor_parallel_size: int = 0
    expert_parallel_size: int = 1
    moe_backend: str = "auto"  # auto: the C kernel for fp32 on CPU, Triton on GPU (engine/moe_backends.py)

    def parallelism(self, world: int) -> Parallelism:
        """How a group of ``world`` ranks splits this engine's model."""
        return Parallelism(world, self.tensor_parallel_size or world, self.expert_parallel_size)


def load_engine_model(config: EngineConfig, tp: TPGroup | None = None) -> Model:
    """The model of an engine (of one rank of ``tp``)."""
    return load_model(
        config.model,
        config.dtype,
        config.attn_backend,
        config.device,
        config.linear_backend,
        tp,
        config.moe_backend,
        config.parallelism(tp.size if tp is not None else 1),
        config.quantized_weights,
        config.kv_cache_dtype,
    )


def max_model_len(config: EngineConfig, mc: ModelConfig) -> int:
    return min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)


def kv_pool(config: EngineConfig, model: Model) -> tuple[KVLayout, int]:
    """The KV pool of an engine (of one rank: its KV heads) and its block count: ``num_blocks``, else
    what ``kv_cache_bytes`` holds, capped at what ``max_num_seqs`` full-length sequences can use.
    Every rank of a tensor-parallel worker holds as many KV heads, so all get the same count."""
    layout = model.kv_layout(config.block_size)
    num_blocks = config.num_blocks
    if num_blocks is None:
        needed = config.max_num_seqs * layout.blocks_for(max_model_len(config, model.config)) + 1
        num_blocks = max(1, min(config.kv_cache_bytes // layout.block_bytes, needed))
    return layout, num_blocks


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    text: str  # the text delta of new_token_ids (may lag a token behind: UTF-8, stop strings)
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass(slots=True)
class _Request:
    seq: Sequence
    seed: int
    detok: IncrementalDetokenizer | None


@dataclass(slots=True)
class StepPlan:
    """One step between its bookkeeping halves: the batch and the sequences it samples."""

    out: SchedulerOutput
    completing: list[Sequence]
    reqs: list[_Request]

    @property
    def request_ids(self) -> list[str]:
        return [e.seq.request_id for e in self.out.scheduled]


class LLMEngine:
    """``tiers`` (optional, engine/tiers.py): builds the G2/G3 tiers over this engine's KV pool;
    they are used only with the prefix cache on (evicted blocks have no hash without it)."""

    def __init__(
        self, config: EngineConfig, tiers: TiersFactory | None = None, tp: TPGroup | None = None
    ) -> None:
        self.config = config
        self.model = load_engine_model(config, tp)
        mc: ModelConfig = self.model.config
        self.model_config = mc
        self.tokenizer = Tokenizer.maybe_from_pretrained(config.model)
        self.eos_token_ids = set(mc.eos_token_ids)
        if self.tokenizer is not None:
            self.eos_token_ids |= set(self.tokenizer.eos_token_ids)
        self.max_model_len = max_model_len(config, mc)
        layout, num_blocks = kv_pool(config, self.model)
        self.kv_layout = layout  # this rank's: only its KV heads when tensor parallel
        self.kv_cache = layout.allocate(num_blocks, config.device)
        self.tier_store: LowerTiers | None = None
        if tiers is not None and config.enable_prefix_caching:
            self.tier_store = tiers(layout, self.kv_cache, mc.fingerprint)
        self.block_manager = BlockManager(
            num_blocks,
            config.block_size,
            mc.fingerprint,
            enable_prefix_caching=config.enable_prefix_caching,
            on_evict=self.tier_store.on_evict if self.tier_store is not None else None,
        )
        self.onboarder = TierOnboarder(self.block_manager, self.tier_store) if self.tier_store else None
        self.step_costs = StepCostModel()
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                enable_chunked_prefill=config.enable_chunked_prefill,
                max_model_len=self.max_model_len,
                max_step_time_s=config.max_step_time_s,
                min_prefill_tokens=config.min_prefill_tokens,
            ),
            self.block_manager,
            self.step_costs,
        )
        self.runner = ModelRunner(self.model, self.kv_cache, config.block_size, config.device)
        self.sampler = Sampler()
        self._requests: dict[str, _Request] = {}
        self._next_id = 0
        self._closed = False

    # -- requests ---------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass token ids")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = list(prompt)
        if not prompt_ids:
            raise ValueError("prompt is empty")
        limit = self.max_seq_len
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context length is {limit}")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, prompt_ids, params, arrival=time.monotonic())
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        detok = None
        if self.tokenizer is not None and self.config.detokenize:
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, stop=list(params.stop))
        if self.onboarder is None or not self.onboarder.begin(seq):
            self.scheduler.add(seq)
        self._requests[request_id] = _Request(seq, seed, detok)
        return request_id

    def abort(self, request_id: str) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if self.onboarder is None or not self.onboarder.abort(request_id):
            self.scheduler.abort(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.onboarder and self.onboarder.num_pending)

    @property
    def max_seq_len(self) -> int:
        """The longest a sequence may grow: the context length, or the KV pool if that is smaller."""
        return self.scheduler.max_seq_len

    def sequence(self, request_id: str) -> Sequence | None:
        """The sequence of a request in flight (waiting, onboarding or running); None if unknown."""
        req = self._requests.get(request_id)
        return req.seq if req is not None else None

    # -- the step -----------------------------------------------------------------------------------
    def step(self, on_layer: LayerHook | None = None) -> list[RequestOutput]:
        """One scheduled batch forward, sampled. ``on_layer(batch)``, when given, is asked for a
        per-layer callback for this batch (a prefill worker streams each layer's KV from it)."""
        plan = self.begin_step()
        if plan is None:
            return []
        return self.finish_step(plan, self.execute_step(plan, on_layer))

    def begin_step(self) -> StepPlan | None:
        """The bookkeeping half before a forward: onboarded prefixes join, the scheduler picks the
        batch (allocating its slots). None: nothing to run. Between ``begin_step`` and
        ``finish_step`` a caller may change the engine's state (add, reserve, release) but must not
        abort a sequence of the plan: ``execute_step`` reads their blocks (decode_pool/ defers
        such aborts to the step boundary)."""
        if self.onboarder is not None and self.onboarder.num_pending:
            for seq in self.onboarder.ready():
                self.scheduler.add(seq)
        out = self.scheduler.schedule()
        if not out.scheduled:
            if self.onboarder is not None:
                self.onboarder.wait(timeout=0.01)  # nothing runs until a G3 read lands
            return None
        completing = [e.seq for e in out.scheduled if e.completes]
        return StepPlan(out, completing, [self._requests[s.request_id] for s in completing])

    def execute_step(self, plan: StepPlan, on_layer: LayerHook | None = None) -> SampleOutput:
        """The compute half: forward pass and sampling. It changes no bookkeeping (scheduler, block
        manager, request table), so it may run while another thread does (under the caller's lock)."""
        out, completing = plan.out, plan.completing
        t0 = time.perf_counter()
        logits = self.runner.execute(out, on_layer(out) if on_layer is not None else None)
        sampled = self.sampler.sample(
            logits,
            [s.params for s in completing],
            [r.seed for r in plan.reqs],
            [s.num_tokens for s in completing],  # the position of the token being sampled
            [(s.prompt_token_ids, s.output_token_ids) for s in completing],
        )
        self.step_costs.record(out.shape, time.perf_counter() - t0, out.num_prefill_tokens)
        return sampled

    def finish_step(self, plan: StepPlan, sampled: SampleOutput) -> list[RequestOutput]:
        """The bookkeeping half after a forward: computed tokens advance, sampled tokens are
        appended, stops are checked and finished sequences free their blocks."""
        self.scheduler.update(plan.out)
        outputs: list[RequestOutput] = []
        for i, (seq, req) in enumerate(zip(plan.completing, plan.reqs, strict=True)):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the forward ran
            token = sampled.token_ids[i]
            seq.output_token_ids.append(token)
            reason = self.stop_reason(seq, token)
            text = ""
            if req.detok is not None:
                text = req.detok.step(token)
                if req.detok.stopped:
                    reason = FinishReason.STOP
                elif reason is not None:
                    text += req.detok.flush()
            result = RequestOutput(
                seq.request_id,
                [token],
                text,
                logprobs=[sampled.logprobs[i]],
                top_logprobs=[sampled.top_logprobs[i]],
                num_prompt_tokens=seq.num_prompt_tokens,
                num_cached_tokens=seq.num_cached_tokens,
            )
            if reason is not None:
                self.scheduler.finish(seq, reason)
                del self._requests[seq.request_id]
                result.finished, result.finish_reason = True, reason
            outputs.append(result)
        return outputs

    def stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        """Why ``seq`` ends with ``token`` (its last output): EOS, a stop token id, max_tokens or
        the context length; None: it goes on. Stop strings are the detokenizer's."""
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return FinishReason.STOP
        if token in p.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_seq_len:
            return FinishReason.LENGTH
        return None

    # -- conveniences ----------------------------------------------------------------------------
    def stream(self) -> Iterator[RequestOutput]:
        """Step until every request has finished, yielding each delta as it is produced."""
        while self.has_unfinished():
            yield from self.step()

    def generate(
        self,
        prompts: Seq[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; one merged RequestOutput per prompt, in order."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        merged = {i: RequestOutput(i, [], "") for i in ids}
        for o in self.stream():
            m = merged[o.request_id]
            m.new_token_ids += o.new_token_ids
            m.text += o.text
            m.logprobs += o.logprobs
            m.top_logprobs += o.top_logprobs
            m.finished, m.finish_reason = o.finished, o.finish_reason
            m.num_prompt_tokens, m.num_cached_tokens = o.num_prompt_tokens, o.num_cached_tokens
        return [merged[i] for i in ids]

    def close(self) -> None:
        if self._closed:
            return
        for request_id in list(self._requests):
            self.abort(request_id)
        if self.onboarder is not None:
            while self.onboarder.num_pending:  # copies still landing in G1 blocks
                self.onboarder.wait(timeout=0.1)
                self.onboarder.ready()
        if self.tier_store is not None:
            self.tier_store.close()
        self._closed = True

    # -- disaggregated serving: a prompt whose KV another worker computes (decode_pool/) -----------
    def check_prompt(self, request_id: str, prompt_ids: list[int]) -> None:
        """Raise ValueError unless a prompt whose KV arrives from elsewhere can be served here (the
        checks of ``reserve_prompt``, for a caller that holds the KV outside G1 for now)."""
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= self.max_seq_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context length is {self.max_seq_len}")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")

    def reserve_prompt(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> Sequence | None:
        """Blocks for a prompt whose KV arrives from a prefill worker: the longest cached prefix
        (shared, ref++) plus fresh blocks for the rest of the prompt. The first
        ``seq.num_cached_tokens`` tokens need not be sent. Returns None (nothing changed) when the
        pool is short. The sequence is not scheduled: pass it to ``add_prefilled`` once its KV is
        committed, or to ``release_prompt`` to give the blocks back."""
        self.check_prompt(request_id, prompt_ids)
        seq = Sequence(request_id, list(prompt_ids), params, arrival=time.monotonic())
        bm = self.block_manager
        if not bm.can_allocate(seq, seq.num_tokens - bm.prefix_hit_tokens(seq)):
            return None
        if not bm.allocate_prompt(seq):
            return None
        if not bm.append_slots(seq, seq.num_tokens - seq.num_computed_tokens):
            bm.free(seq)
            return None
        return seq

    def release_prompt(self, seq: Sequence) -> None:
        """Give back the blocks of a ``reserve_prompt`` sequence that never joined the batch."""
        self.block_manager.free(seq)

    def add_prefilled(
        self,
        seq: Sequence,
        first_token: int,
        seed: int,
        logprob: float | None = None,
        top_logprobs: list[tuple[int, float]] | None = None,
    ) -> RequestOutput:
        """Adopt a ``reserve_prompt`` sequence whose prompt KV is now in its blocks, with the first
        token the prefill worker sampled (at position ``num_prompt_tokens``, seed ``seed``). It
        joins the running batch; its prompt blocks enter the prefix cache. Returns the first
        token's output; if that token already ends the request its blocks are freed at once."""
        n = seq.num_prompt_tokens
        seq.num_computed_tokens = n
        self.block_manager.mark_computed(seq, n)
        seq.output_token_ids.append(first_token)
        detok = None
        if self.tokenizer is not None and self.config.detokenize:
            detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, stop=list(seq.params.stop))
        reason = self.stop_reason(seq, first_token)
        text = ""
        if detok is not None:
            text = detok.step(first_token)
            if detok.stopped:
                reason = FinishReason.STOP
            elif reason is not None:
                text += detok.flush()
        result = RequestOutput(
            seq.request_id,
            [first_token],
            text,
            logprobs=[logprob],
            top_logprobs=[top_logprobs],
            num_prompt_tokens=n,
            num_cached_tokens=seq.num_cached_tokens,
        )
        if reason is None:
            self.scheduler.add_running(seq)
            self._requests[seq.request_id] = _Request(seq, seed, detok)
        else:
            self.block_manager.free(seq)
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
            result.finished, result.finish_reason = True, reason
        return result
