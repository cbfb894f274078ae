# Two entry points, both self-contained on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# aarch64 TVM runtime, so the cross-compilation test runs the library under qemu (skips without it).
CROSS_RT := $(VENV)/tvm-runtime/aarch64

.PHONY: demo test lint typecheck bench clean

# torch==2.13.0 (a pin in pyproject.toml) resolves to the CPU build on these machines.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[prune,quant,tvm,openvino,search,ray,hf,llm,dev]'
	# Type stubs for TensorRT; --no-deps because their metadata pulls the multi-GB runtime.
	$(BIN)/pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
	# The plugin manifest (compress/core/__pycache__), so the first `compress targets`, `passes` or recipe error
	# answers without importing torch; it is rebuilt by itself whenever a plugin changes.
	$(BIN)/compress passes > /dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/compress run examples/digits.toml

$(CROSS_RT)/runtime.json: $(STAMP)
	-$(BIN)/compress tvm-runtime aarch64 --dest $(CROSS_RT)

test: $(STAMP) $(CROSS_RT)/runtime.json
	$(BIN)/ruff check .
	$(BIN)/mypy compress passes targets
	VENV=$(VENV) .ci/typecheck-tensorrt
	COMPRESS_TVM_CROSS_RUNTIME=$(abspath $(CROSS_RT)) $(BIN)/pytest -q

typecheck: $(STAMP)
	$(BIN)/mypy compress passes targets
	VENV=$(VENV) .ci/typecheck-tensorrt

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .compress-cache runs
