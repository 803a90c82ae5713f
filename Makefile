# Every target builds .venv first. Torch is installed on its own first so the
# resolver takes the CPU build instead of fetching a multi-GB CUDA one.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow bench gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/evomerge search populations/digits-scratch.yaml --budget 5000 --workers 2 --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Long (an hour or more on 2 cores); each script prints ratios measured in its own run.
bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/staleness.py
	$(BIN)/python benchmarks/staleness.py --llm
	$(BIN)/python benchmarks/subsample.py
	$(BIN)/python benchmarks/recorder.py
	$(BIN)/python benchmarks/materialise.py
	$(BIN)/python benchmarks/digits_paper.py
	$(BIN)/python benchmarks/compare_digits.py
	test -d models/tiny-lm/expert_add || $(BIN)/evomerge fixtures tiny-lm models/tiny-lm
	$(BIN)/python benchmarks/tiny_lm.py
	$(BIN)/python benchmarks/compare_tiny_lm.py
	$(BIN)/python benchmarks/subsample.py --population tiny-lm-skills --budgets 33,100,300 --seeds 3 --variants full,f0.1,f0.25
	$(BIN)/python benchmarks/lm_eval_overhead.py
	$(BIN)/python benchmarks/guided_dam.py
	$(BIN)/python benchmarks/llm_scale.py

# On a machine with a GPU (torch + transformers are enough; no Ray, Optuna or pydantic).
gpu-check:
	python3 benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) runs
