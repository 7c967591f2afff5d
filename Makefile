# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
# A bare `torch` requirement resolves to a multi-GB CUDA build, so torch is installed first, pinned, when it
# is missing: this team's package index serves its CPU build. Elsewhere ask for a CPU wheel, e.g.
# `make test PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu` (pip reads PIP_* from the environment;
# an extra index, so the other requirements still come from PyPI).
TORCH_SPEC ?= torch==2.13.0
# nytorch 1.1, the reference that tests/test_compat_11.py compares with (a separate library named
# `nytorch`, so never installed over this one: it goes to its own folder, imported by a subprocess).
NYTORCH11_PATH ?= /tmp/nyto11
export NYTORCH11_PATH

.PHONY: install demo test typecheck bench floor gpu-deps

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	$(PYTHON) examples/demo.py

test: install
	@test -d "$(NYTORCH11_PATH)/nytorch" || $(PYTHON) -m pip install -q --no-deps --target "$(NYTORCH11_PATH)" nytorch==1.1.0 \
		|| echo "nytorch 1.1 could not be installed: tests/test_compat_11.py skips its comparisons"
	$(PYTHON) -m pytest -q
	$(PYTHON) -m mypy

typecheck: install
	$(PYTHON) -m mypy

bench: install
	$(PYTHON) -m benchmarks --quick

# The oldest versions pyproject.toml allows, in a virtual environment of their own (.floor/, which git
# ignores): the test suite passing there is what makes those floors true. A few minutes and a few GB (PyPI's
# torch brings CUDA libraries; PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for a CPU build).
FLOOR_PYTHON ?= python3.10
FLOOR_SPECS ?= torch==2.10.0 optree==0.10.0 numpy==1.22.4
floor:
	@test -x .floor/bin/python || $(FLOOR_PYTHON) -m venv .floor
	.floor/bin/python -m pip install -q $(FLOOR_SPECS) -e ".[dev]"
	@test -d "$(NYTORCH11_PATH)/nytorch" || .floor/bin/python -m pip install -q --no-deps --target "$(NYTORCH11_PATH)" \
		nytorch==1.1.0 || echo "nytorch 1.1 could not be installed: tests/test_compat_11.py skips its comparisons"
	.floor/bin/python -m pytest -q

# What a lent GPU machine lacks, into .device/ (git ignores it) for benchmarks/on_gpu.sh:
# optree built for its Python (GPU_PYTHON), nytorch 1.1 and tensordict for their rows.
GPU_PYTHON ?= 3.12
gpu-deps:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .device/whl optree
	$(PYTHON) -m pip install -q --no-deps --target .device/nyto11 nytorch==1.1.0
	$(PYTHON) -m pip install -q --no-deps --target .device/td tensordict pyvers
