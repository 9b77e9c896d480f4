# make demo   — set up, generate synthetic data, train, evaluate, export (minutes on a CPU)
# make test   — set up, lint, build the docs (strict), run the whole test suite
# make bench  — set up, run the benchmarks in benchmarks/ (ratios against in-run baselines)
# make docs   — build the documentation site into site/ (make docs-serve: live preview)
# make lint   — ruff: lint and formatting check
# make test-backends — a second venv (.cache/venv-jax: jax[cpu] + kfundus, TensorFlow for
#               tf.data) and the backend matrix tests/backends (TF vs JAX; torch if installed)
# make fixtures — the torch venv (.cache/venv-torch: torch, torchvision, timm, transformers,
#               open_clip, safetensors) regenerates the tiny reference checkpoints and outputs in
#               tests/fixtures/foundation that make test reads (kfundus itself never imports torch)
# make test-foundation — full-size random-weight references (RETFound ViT-L/16, FLAIR ResNet-50 +
#               BERT-base, RET-CLIP ViT-B/16 + BERT-base) written to $(FOUNDATION), converted and
#               compared by tests/foundation (several GB of disk and RAM, minutes)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kfundus-installed
# the suite runs on two pytest-xdist workers; every file stays on one worker (its
# module fixtures are built once). `make test PYTEST_WORKERS=` runs it serially.
PYTEST_WORKERS ?= -n 2 --dist loadfile

BVENV  ?= .cache/venv-jax
BPY    := $(BVENV)/bin/python
BSTAMP := $(BVENV)/.kfundus-installed

TVENV  ?= .cache/venv-torch
TPY    := $(TVENV)/bin/python
FOUNDATION ?= .cache/foundation

.PHONY: demo test bench docs docs-serve lint install clean test-backends fixtures test-foundation

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,docs,lint]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m kfundus demo --out demo

lint: $(STAMP)
	$(VENV)/bin/ruff check kfundus tests benchmarks train.py evaluate.py
	$(VENV)/bin/ruff format --check kfundus tests benchmarks train.py evaluate.py

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	@echo "documentation site: $(CURDIR)/site/index.html"

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

test: $(STAMP) lint docs
	$(PY) -m pytest -q $(PYTEST_WORKERS) tests

bench: $(STAMP)
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/tflite.py
	$(PY) benchmarks/lora.py

$(BSTAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(BVENV)
	$(BPY) -m pip install --quiet --upgrade pip
	$(BPY) -m pip install --quiet "jax[cpu]" -e ".[test]"
	-$(BPY) -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu  # optional: adds torch
	touch $(BSTAMP)

test-backends: $(BSTAMP)
	KFUNDUS_BACKEND_MATRIX=1 $(BPY) -m pytest -q -s tests/backends

$(TPY):
	$(PYTHON) -m venv $(TVENV)
	$(TPY) -m pip install --quiet --upgrade pip
	$(TPY) -m pip install --quiet torch torchvision --index-url https://download.pytorch.org/whl/cpu \
		|| $(TPY) -m pip install --quiet torch torchvision  # the CPU wheels are smaller; PyPI's also work
	$(TPY) -m pip install --quiet timm transformers open_clip_torch safetensors numpy

fixtures: $(TPY)
	$(TPY) tests/fixtures/foundation/make_fixtures.py
	$(TPY) tests/fixtures/foundation/make_flair_retclip.py

test-foundation: $(STAMP) $(TPY)
	$(TPY) tests/fixtures/foundation/make_fixtures.py --full --out $(FOUNDATION)
	$(TPY) tests/fixtures/foundation/make_flair_retclip.py --full --out $(FOUNDATION)
	KFUNDUS_FOUNDATION=$(abspath $(FOUNDATION)) $(PY) -m pytest -q -s tests/foundation

clean:
	rm -rf demo runs site .pytest_cache
