# make demo   — set up, generate synthetic data, train, evaluate, export (minutes on a CPU)
# make test   — set up, run the whole test suite
# make bench  — set up, run the benchmarks in benchmarks/ (ratios against in-run baselines)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kfundus-installed

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m kfundus demo --out demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/tflite.py
	$(PY) benchmarks/lora.py

clean:
	rm -rf demo runs .pytest_cache
