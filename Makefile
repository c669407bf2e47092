# `make demo` and `make test` do all set-up on a fresh machine: they create .venv when it is
# missing and install into it, PyTorch first (a bare `torch` requirement would pull CUDA wheels).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv clean-demo

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[scoring,dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/agfsync-jax pipeline --config=configs/tiny.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# The edit-test loop: everything but the tests marked slow (the demo, subprocess and
# multi-process tests); `make test` (CI) runs them all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow" $(PYTEST_ARGS)

clean-demo:
	rm -rf $(WORKDIR)
