# slmfast — every target sets up what it needs: `make test` and `make demo` work on a fresh clone.
#   make install     .venv + torch (TORCH=torch==2.13.0 unless given) + slmfast[dev,trl,lightning], editable, _C built
#   make build       rebuild slmfast._C in place after editing csrc/ (incremental, ninja)
#   make test        cuda-check (when nvcc is present), then the test suite
#   make demo        the distillation demo (see README)
#   make cuda-check  compile every csrc/cuda/*.cu for sm_80 and sm_90a, print the ptxas report
#   make bench       CPU benchmarks (tables; append to benchmarks/RESULTS.md by hand)
#   make lint        ruff

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_ARGS ?= -n auto   # pytest-xdist: one worker per core
NVCC := $(shell command -v nvcc 2>/dev/null || ( [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc ))

.PHONY: install build test demo cuda-check bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-run the dependency install only when the package metadata changes.
$(VENV)/.installed: pyproject.toml setup.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install --upgrade "setuptools>=77" wheel
	$(PY) -m pip install -e '.[dev,trl,lightning]' --no-build-isolation
	touch $@

install: $(VENV)/.installed build

# flock: several shells (or helpers) building at once would share build/ and corrupt it.
build: $(VENV)/.installed
	mkdir -p build && flock build/.lock $(PY) setup.py --quiet build_ext --inplace

test: install
ifneq ($(NVCC),)
	$(MAKE) cuda-check
else
	@echo "make test: nvcc not found, skipping cuda-check"
endif
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) -m slmfast demo

cuda-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) tools/cuda_check.py

bench: install
	$(PY) benchmarks/bench_rms_norm.py --table && $(PY) benchmarks/bench_glu.py --table && $(PY) benchmarks/bench_layer_norm.py --table && $(PY) benchmarks/bench_rotary.py --table

lint: install
	$(PY) -m ruff check slmfast tests benchmarks tools setup.py

clean:
	rm -rf build slmfast/_C*.so $(VENV)/.installed
