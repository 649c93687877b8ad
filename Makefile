# Two entry points for a fresh machine: `make run` and `make test`. Each builds its own virtual
# environment. torch is pinned in the same pip command as everything that needs it, so pip never
# pulls a multi-GB CUDA build of torch for the CPU machines this runs on.
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
RUN_VENV := .venv-run
TEST_VENV := .venv

.PHONY: run test bench

$(RUN_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/pip install -q --upgrade pip
	$(RUN_VENV)/bin/pip install -q -e . "$(TORCH_PIN)"
	touch $@

$(TEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install -q --upgrade pip
	$(TEST_VENV)/bin/pip install -q -e ".[dev]" "$(TORCH_PIN)"
	touch $@

run: $(RUN_VENV)/.installed
	$(RUN_VENV)/bin/moeinf run

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m pytest -q

bench: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m bench.e2e
