# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
# A bare `torch` requirement resolves to a multi-GB CUDA build; pin the CPU wheel unless torch is present.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test typecheck bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	$(PYTHON) examples/demo.py

test: install
	$(PYTHON) -m pytest -q
	$(PYTHON) -m mypy

typecheck: install
	$(PYTHON) -m mypy

bench: install
	$(PYTHON) -m benchmarks --quick
