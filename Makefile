# `make test` and `make demo` set themselves up on a fresh machine: they create .venv, install the
# package with its test extras, then run. torch is installed only when .venv has none, so a
# venv made with `make VENV_ARGS=--system-site-packages ...` keeps the CUDA torch you already have.
VENV ?= .venv
VENV_ARGS ?=
PYTHON ?= python3
PY := $(VENV)/bin/python
# The versions this project is tested with; torchvision is needed by timm.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: test demo bench gpu-check clean

$(VENV)/.installed: setup.py requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) -m msvit.demo --out demo_out

bench: $(VENV)/.installed
	$(PY) -m pytest bench/ --benchmark -q

clean:
	rm -rf $(VENV) demo_out .pytest_cache .benchmarks *.egg-info
