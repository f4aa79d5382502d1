# Two commands do all set-up on a fresh machine (Python 3.10+ with pip and venv):
#   make demo   builds the bundled model, compiles it for cpu and prints the verification table
#   make test   runs the test suite and the quick benchmark (so the bench never rots)
#   make bench  the full benchmark into docs/benchmarks/ (about 30 minutes)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CORE   := $(VENV)/.installed-core
FULL   := $(VENV)/.installed-full

.PHONY: demo test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# the compiler alone: what `make demo` needs (no torch, no transformers)
$(CORE): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e .
	touch $(CORE)

# plus the test, benchmark, exporter and Ray extras
$(FULL): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e ".[test,bench,export,ray]"
	touch $(CORE) $(FULL)

demo: $(CORE)
	$(PY) models/small_cnn.py build/demo
	$(VENV)/bin/qcompile build/demo/small_cnn.onnx --target cpu --recipe w8a8 \
		--calib build/demo/calib.npz --verify-data build/demo/eval.npz -o build/demo/out

test: $(FULL)
	$(PY) tools/bench.py --quick --out build/bench-quick
	$(PY) -m pytest -q

bench: $(FULL)
	$(PY) tools/bench.py

clean:
	rm -rf build $(VENV)
