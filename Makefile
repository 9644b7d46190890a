# Two commands on a fresh machine: `make train` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/pretrain_causal.py
WORKDIR ?= runs/default
# pytest-xdist workers for `make test`; each test file runs whole in one worker (its module fixtures are
# built once). Compiles are single-threaded, so 2 workers keep 2 cores busy.
TEST_WORKERS ?= 2

.PHONY: train test setup clean bench

$(BIN)/.installed: requirements.txt requirements-test.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

setup: $(BIN)/.installed

train: setup
	$(BIN)/python train.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20 tests

bench: setup
	$(BIN)/python scripts/benchmark.py --config=configs/shakespeare_char.py

clean:
	rm -rf $(VENV) runs .pytest_cache
