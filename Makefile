# Two commands do all set-up on a fresh machine:
#   make demo   -> create/refresh .venv, install, run `qinco demo`
#   make test   -> create/refresh .venv, install, run the test suite
# Both are idempotent: the install step re-runs only when pyproject.toml or requirements.lock change.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench clean lock

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c requirements.lock "torch==2.13.0"
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/qinco demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

# One benchmark of bench/ (default: the search-quality one), e.g. `make bench BENCH=bench_codec ARGS="--help"`.
BENCH ?= bench_search
bench: $(STAMP)
	$(BIN)/python bench/$(BENCH).py $(ARGS)

# Regenerate the lock from the current venv (after changing a dependency in pyproject.toml).
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v "^qinco-pipeline" | sed "s/^torch==\(.*\)+cpu/torch==\1/" > requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info
