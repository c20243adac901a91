# Dogs vs. Cats Redux: images -> uint8 arrays -> GAP features -> CV heads -> clipped submission.
# Every target is one CLI call; file targets declare their inputs so `make` redoes only what is
# stale. `make help` lists targets and variables.

SHELL := /bin/bash
.DEFAULT_GOAL := submission
.SECONDEXPANSION:

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
CLIP ?= auto
WORKERS ?=
BACKBONE ?= efficientnet_lite0
BLOCKS ?= 1
AUGMENT ?= flip
FT_HEAD ?= logreg
FT_EPOCHS ?=
FT_LR ?=
FT_BATCH ?=
FT_PATIENCE ?=
FT_DROPOUT ?=

PY := $(VENV)/bin/python
CLI := $(PY) -m dogscats.cli
SETUP := $(VENV)/.installed
export WEIGHTS_DIR
export TF_CPP_MIN_LOG_LEVEL ?= 2

# Derived files live apart per dataset: the folder name plus a hash of DATA_DIR's absolute path
# (src/dogscats/config.py:dataset_key computes the same; a test keeps them in step).
ifneq ($(words $(DATA_DIR)),1)
$(error DATA_DIR='$(DATA_DIR)': make cannot handle spaces in paths; link the folder to a path without them)
endif
ABS_DATA := $(abspath $(DATA_DIR))
DS := $(notdir $(ABS_DATA))-$(shell printf '%s' '$(ABS_DATA)' | sha1sum | cut -c1-8)
OUT := features/$(DS)
ARR := $(OUT)/arrays

# name:input_size pairs from the registry (stdlib only: answers before the venv exists).
PLAN := $(shell PYTHONPATH=src $(PYTHON) -m dogscats.cli backbones --sizes $(BACKBONES) $(if $(filter finetune,$(HEAD) $(MAKECMDGOALS)),$(BACKBONE)))
NAMES := $(foreach p,$(PLAN),$(firstword $(subst :, ,$(p))))
SIZES := $(sort $(foreach p,$(PLAN),$(lastword $(subst :, ,$(p)))))
size_of = $(lastword $(subst :, ,$(filter $(1):%,$(PLAN))))

empty :=
space := $(empty) $(empty)
flag = $(if $(filter $(2),$(1)),$(3))
TAG := $(call flag,$(WEIGHTS),random,.random)$(call flag,$(PRECISION),bfloat16,.bf16)$(call flag,$(TTA),flip,.flip)
# A file with mirrored features also holds the plain ones: TTA=none reuses it, never re-extracts.
feature_file = $(or $(if $(filter none,$(TTA)),$(wildcard $(OUT)/$(1)$(TAG).flip.h5)),$(OUT)/$(1)$(TAG).h5)
FEATURE_FILES := $(foreach n,$(NAMES),$(call feature_file,$(n)))
TAG_PARTS := $(subst .,__,$(TAG))$(if $(filter-out 5,$(FOLDS)),__folds$(FOLDS))$(if $(filter-out 2017,$(SEED)),__seed$(SEED))
# Fine-tuning starts from the head fitted on BACKBONE's features alone (FT_HEAD), fold by fold.
FT_HEAD_RUN := $(OUT)/models/$(BACKBONE)__$(FT_HEAD)$(TAG_PARTS)
# FT_* hyperparameters left empty keep finetune.py's defaults; one that is set names the run
# (so make redoes it) and reaches the CLI.
ft_part = $(if $($(1)),__$(2)$($(1)))
ft_flag = $(if $($(1)),--$(2) $($(1)))
FT_PARTS := $(call ft_part,FT_EPOCHS,ep)$(call ft_part,FT_LR,lr)$(call ft_part,FT_BATCH,bs)$(call ft_part,FT_PATIENCE,pat)$(call ft_part,FT_DROPOUT,drop)
FT_FLAGS := $(strip $(call ft_flag,FT_EPOCHS,epochs) $(call ft_flag,FT_LR,learning-rate) $(call ft_flag,FT_BATCH,batch-size) $(call ft_flag,FT_PATIENCE,patience) $(call ft_flag,FT_DROPOUT,dropout))
FT_RUN := $(BACKBONE)__finetune$(BLOCKS)__aug$(AUGMENT)$(FT_PARTS)$(TAG_PARTS)
RUN := $(subst $(space),+,$(NAMES))__$(HEAD)$(TAG_PARTS)
ifeq ($(HEAD),finetune)
RUN := $(FT_RUN)
FEATURE_FILES := $(call feature_file,$(BACKBONE))
endif
RUN_DIR := $(OUT)/models/$(RUN)
SUBMISSION ?= submissions/$(DS)/$(RUN)$(if $(filter-out auto,$(CLIP)),__clip$(CLIP)).csv
LABELS ?= $(DATA_DIR)/test_labels.csv

.PHONY: help setup data preprocess features train finetune submission score backbones bench test \
	lint clean \
	check-backbones

help: ## list targets and variables
	@grep -E '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo "Variables:"; sed -n 's/^\([A-Z_]*\) ?= \(.*\)/  \1=\2/p' $(MAKEFILE_LIST)

setup: $(SETUP) ## create .venv and install the package with its dependencies

$(SETUP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

check-backbones:
	@test -n "$(PLAN)" || { echo "error: BACKBONES='$(BACKBONES)' names no registered backbone (make backbones lists them)" >&2; exit 2; }

backbones: | $(SETUP) ## list the backbone registry
	@$(CLI) backbones

data: | $(SETUP) ## check DATA_DIR; unzip or download the competition (Kaggle CLI) if missing
	$(CLI) data --data-dir '$(DATA_DIR)'

preprocess: $(foreach s,$(SIZES),$(ARR)/$(s)/manifest.json) | check-backbones ## images -> uint8 arrays, one per input size

$(ARR)/%/manifest.json: $(wildcard $(DATA_DIR)/train $(DATA_DIR)/test) | $(SETUP)
	$(CLI) data --data-dir '$(DATA_DIR)'
	$(CLI) preprocess --data-dir '$(DATA_DIR)' --size $* --out $(ARR)/$* $(if $(WORKERS),--workers $(WORKERS))

features: $(FEATURE_FILES) | check-backbones ## GAP features of each of BACKBONES

# $(call extract,backbone,tta,output)
extract = $(CLI) features --data-dir '$(DATA_DIR)' --backbone $(1) --weights $(WEIGHTS) --tta $(2) \
	--precision $(PRECISION) --batch-size $(BATCH_SIZE) --arrays $(ARR)/$(call size_of,$(1)) --out $(3)

$(OUT)/%$(TAG).h5: $(ARR)/$$(call size_of,$$*)/manifest.json | $(SETUP)
	$(call extract,$*,$(TTA),$@)

ifeq ($(TTA),none)
$(OUT)/%$(TAG).flip.h5: $(ARR)/$$(call size_of,$$*)/manifest.json | $(SETUP)
	$(call extract,$*,flip,$@)
endif

train: $(RUN_DIR)/metrics.json ## cross-validated head on the concatenated features

# $(call train_head,feature files,run folder,head)
train_head = $(CLI) train --features $(1) --out $(2) --head $(3) --tta $(TTA) --folds $(FOLDS) --seed $(SEED)

# heads.py is a prerequisite: after a code change the CLI decides from the run's recorded
# settings (heads.METHOD_VERSION among them) whether to retrain, and marks it fresh if not.
ifneq ($(HEAD),finetune)
$(RUN_DIR)/metrics.json: $(FEATURE_FILES) src/dogscats/heads.py | check-backbones $(SETUP)
	$(call train_head,$(FEATURE_FILES),$(@D),$(HEAD))
endif

ifneq ($(FT_HEAD_RUN),$(RUN_DIR))
$(FT_HEAD_RUN)/metrics.json: $(call feature_file,$(BACKBONE)) src/dogscats/heads.py | $(SETUP)
	$(call train_head,$<,$(@D),$(FT_HEAD))
endif

finetune: $(OUT)/models/$(FT_RUN)/metrics.json ## fine-tune BLOCKS top blocks of BACKBONE, per fold

# finetune.py is a prerequisite: after a code change the CLI decides from the run's recorded
# settings (METHOD_VERSION among them) whether to redo it, and marks it fresh if not.
$(OUT)/models/$(FT_RUN)/metrics.json: $(FT_HEAD_RUN)/metrics.json $(ARR)/$$(call size_of,$(BACKBONE))/manifest.json src/dogscats/finetune.py | $(SETUP)
	$(CLI) finetune --data-dir '$(DATA_DIR)' --backbone $(BACKBONE) --blocks $(BLOCKS) \
		--head-run $(FT_HEAD_RUN) --augment $(AUGMENT) --weights $(WEIGHTS) --seed $(SEED) \
		--arrays $(ARR)/$(call size_of,$(BACKBONE)) --out $(@D) $(FT_FLAGS)

submission: $(SUBMISSION) ## (default) clipped submission CSV; redoes only what is stale
	@$(if $(SUBMISSION_MADE),:,echo "$(SUBMISSION) is up to date: nothing to redo.")

$(SUBMISSION): $(RUN_DIR)/metrics.json $(wildcard $(DATA_DIR)/sample_submission.csv) | $(SETUP)
	$(eval SUBMISSION_MADE := 1)
	$(CLI) submission --run-dir $(RUN_DIR) --sample-submission '$(DATA_DIR)/sample_submission.csv' \
		--out $@ --clip $(CLIP)

score: | $(SETUP) ## log loss and accuracy of SUBMISSION against LABELS (id,label)
	@$(CLI) score --submission '$(SUBMISSION)' --labels '$(LABELS)'

BENCH_DATA ?= ../shared/data/dogs-vs-cats-sample
bench: | $(SETUP) ## speed and memory against bare loops: writes bench/REPORT.md
	$(CLI) bench --data-dir '$(BENCH_DATA)' --out bench/REPORT.md

test: | $(SETUP) ## the whole test suite
	$(PY) -m pytest

lint: | $(SETUP) ## ruff
	$(VENV)/bin/ruff check src tests scripts

clean: ## remove caches of Python (never data, features or submissions)
	find . -name __pycache__ -type d -prune -exec rm -rf {} + ; rm -rf .pytest_cache .ruff_cache

print-%: ; @echo '$($*)'
