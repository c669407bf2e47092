# `make demo` and `make test` do all set-up on a fresh machine: they create .venv when it is
# missing and install into it, PyTorch and torchvision first (a bare `torch` requirement lets pip
# pick the build), then this package with the scoring, test and TPU-plan extras.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# The demo is sized for a CPU. libtpu (the tpu-plan extra, for compile-only TPU plans) would
# otherwise make every JAX process probe for TPU chips and hold libtpu's lock while it runs.
DEMO_PLATFORMS ?= cpu
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv clean-demo

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[scoring,dev,tpu-plan]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	JAX_PLATFORMS=$(DEMO_PLATFORMS) $(BIN)/agfsync-jax pipeline --config=configs/tiny.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# The edit-test loop: everything but the tests marked slow (the demo, subprocess and
# multi-process tests); `make test` (CI) runs them all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow" $(PYTEST_ARGS)

clean-demo:
	rm -rf $(WORKDIR)
