# `make test` and `make demo` set themselves up on a fresh machine: they create .venv, install the
# package with its test extras, then run. torch is installed only when .venv has none, so a
# venv made with `make VENV_ARGS=--system-site-packages ...` keeps the CUDA torch you already have.
#
# TORCH=cuda (default): torch from PyPI, whose NVIDIA libraries are 3.2 GB of the 5.9 GB venv even
# on a machine without a GPU. TORCH=cpu: the CPU build, in its own venv so the two never mix
# (`make test TORCH=cpu`). The CPU wheels come from PyTorch's CPU index; offline, with the wheels
# in a local mirror or pip's find-links, pass TORCH_INDEX= to skip it.
TORCH ?= cuda
ifeq ($(TORCH),cpu)
VENV ?= .venv-cpu
# torchvision 0.28.0 is the release for torch 2.13 (it pins torch==2.13.0); timm imports it. Both
# must be CPU builds: PyPI's torchvision links torch's CUDA libraries and, next to a CPU torch,
# fails on import ("operator torchvision::nms does not exist").
TORCH_SPEC ?= torch==2.13.0+cpu torchvision==0.28.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
else ifeq ($(TORCH),cuda)
VENV ?= .venv
# The versions this project is tested with; torchvision is needed by timm.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
else
$(error TORCH must be cuda or cpu, not '$(TORCH)')
endif
VENV_ARGS ?=
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: test demo bench compile-report pretrained clean

$(VENV)/.installed: setup.py requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -c "import timm"  # a torchvision built for another torch fails here, not in the middle of the tests
	touch $@

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) -m msvit.demo --out demo_out

bench: $(VENV)/.installed
	$(PY) -m pytest bench/ --benchmark -q

# Ahead-of-time compile of every Triton kernel config for sm_70 .. sm_90 (no GPU needed). It writes
# bench/results-local/compile/ (ignored by git); `make compile-report RECORD=1` the committed
# bench/results/compile/.
RECORD ?=
COMPILE_OUT := $(if $(RECORD),bench/results/compile,bench/results-local/compile)
compile-report: $(VENV)/.installed
	$(PY) -m msvit_kernels.compile_report --out $(COMPILE_OUT) > /dev/null
	@echo "compile report: $(COMPILE_OUT)/summary.md"

# Retrain the shipped cluttered-digits model (docs/training.md: 15 min on 2 CPU cores) and install it.
pretrained: $(VENV)/.installed
	$(VENV)/bin/msvit train --train-size 38000 --val-size 2000 --image-size 64 --digit-scale 0.15 0.3 --shift 8 \
	    --model-kwargs '{"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 2}' \
	    --coarse-patch 16 --gate-hidden 64 --epochs 15 --warmup-epochs 0.5 \
	    --gate-start-epoch 9 --gate-mode masked --gate-mode-epochs 2 --gate-warmup-epochs 0.5 \
	    --lr 1e-3 --gate-lr 2e-2 --gate-loss l0-two-sided --gate-loss-input probs --gate-target 0.25 --gate-lambda 4 \
	    --batch-size 64 --out runs/digits
	# the run's last checkpoint is the epoch folder its manifest names (msvit/train/run_folder.py)
	dir="$$($(PY) -c 'from msvit.io.checkpoint import resolve; print(resolve("runs/digits"))')" && \
	    cp "$$dir/model.safetensors" "$$dir/config.json" runs/digits/metrics.jsonl msvit/pretrained/cluttered-digits/

clean:
	rm -rf $(VENV) demo_out .pytest_cache .benchmarks *.egg-info
