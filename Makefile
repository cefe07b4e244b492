# Two commands on a fresh machine: `make demo` and `make test`.
# Each sets up .venv idempotently: torch==2.13.0 first (a CPU wheel; a plain
# `torch` requirement would pull a multi-GB CUDA build), then the package with
# its dev extras, built without build isolation so the op library compiles
# against the installed torch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Two workers for the 2-core CI machine (each test process uses one torch thread); each test
# file runs whole, in order, on one worker, so module-scoped fixtures see the same history every run.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: setup build test test-slow demo bench clean

$(VENV)/.stamp-torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=68" wheel cmake ninja
	$(PIP) install -q torch==$(TORCH_VERSION)
	touch $@

$(VENV)/.stamp-install: $(VENV)/.stamp-torch pyproject.toml setup.py
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	touch $@

# The op library (csrc/, CMakeLists.txt) is rebuilt incrementally when its sources change.
OPS_SOURCES := CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
$(VENV)/.stamp-ops: $(VENV)/.stamp-install $(OPS_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

setup: $(VENV)/.stamp-install $(VENV)/.stamp-ops

# The op tests, run a second time on the pure-PyTorch reference kernels.
OPS_TESTS := tests/test_ops.py tests/test_ops_build.py

# $(call pytest,BACKEND,ARGS): pytest with FXCOMPRESS_OPS_BACKEND=BACKEND. Exit code 5
# (no tests collected) is a failure here, never a pass.
define pytest
FXCOMPRESS_OPS_BACKEND=$(1) $(PY) -m pytest -q $(2); rc=$$?; \
if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; exit 1; fi; exit $$rc
endef

# The suite requires the compiled op library (FXCOMPRESS_OPS_BACKEND=compiled: importing
# fxcompress fails if the library did not build or was built against another torch), so
# the compiled-kernel tests cannot all skip and leave CI green; then the op tests run on
# the reference kernels.
test: setup
	FXCOMPRESS_OPS_BACKEND=compiled $(PY) -c "import fxcompress.ops as ops; print('op library:', ops.backend_info())"
	$(call pytest,compiled,$(PYTEST_ARGS))
	$(call pytest,reference,$(PYTEST_ARGS) $(OPS_TESTS))

test-slow: setup
	$(call pytest,compiled,-m slow $(PYTEST_ARGS))

demo: setup
	$(PY) examples/digits_demo.py

bench: setup
	for f in benchmarks/kernels.py benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf build dist *.egg-info $(VENV)
