"""What `make` builds for a set of variables: every output path and rule, from config's names.

The Makefile calls `python -m dogscats.cli plan ...` once per invocation and evaluates the
make syntax it prints, so the names of arrays, feature files, runs and submissions have one
owner (config.py). Standard library only: it answers before the venv exists, in milliseconds.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from dogscats import backbones, config

LINE_BREAK = ";;"  # make's $(shell) turns newlines into spaces; the Makefile splits on this
_LAYER_NAME = re.compile(r"[A-Za-z0-9_.\-]*")  # a Keras layer name; empty = the output


@dataclass(frozen=True)
class Variables:
    """The Makefile's variables, as strings (empty = not set)."""

    data_dir: str = "data"
    backbones: str = "inception_v3 xception resnet50"
    head: str = config.DEFAULT_HEAD
    tta: str = "none"
    weights: str = "imagenet"
    precision: str = "float32"
    folds: str = str(config.FOLDS)
    seed: str = str(config.SEED)
    clip: str = "auto"
    backbone: str = "efficientnet_lite0"
    blocks: str = "1"
    augment: str = "flip"
    ft_head: str = config.DEFAULT_HEAD
    layer: str = ""  # pool this layer of each of BACKBONES instead of its output
    finetune: bool = False  # HEAD=finetune or `make finetune`: BACKBONE's arrays are needed
    hyperparameters: dict[str, str] = field(default_factory=dict)  # FT_* set on the command line


# The plain string fields: one `--name` flag each on `dogscats.cli plan`.
MAKE_VARIABLES = tuple(
    f.name for f in fields(Variables) if f.name not in ("finetune", "hyperparameters")
)


def _relative(path: Path) -> str:
    """Paths as make sees them from the project root (where the Makefile runs)."""
    try:
        return str(path.relative_to(config.PROJECT_ROOT))
    except ValueError:
        return str(path)


def _check(v: Variables) -> None:
    """The values that name outputs; a bad one stops make before any work."""
    for name, value, choices in (
        ("HEAD", v.head, (*config.HEADS, "finetune")),
        ("FT_HEAD", v.ft_head, config.HEADS),
        ("TTA", v.tta, config.TTAS),
        ("PRECISION", v.precision, config.PRECISIONS),
        ("AUGMENT", v.augment, config.AUGMENTS),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}. Received: {value!r}")
    for name, value in (("FOLDS", v.folds), ("SEED", v.seed), ("BLOCKS", v.blocks)):
        if not value.isdigit():
            raise ValueError(f"{name} must be a whole number. Received: {value!r}")
    if " " in os.path.abspath(v.data_dir):
        raise ValueError(
            f"DATA_DIR={v.data_dir!r}: make cannot handle spaces in paths; link the folder to "
            "a path without them"
        )
    if v.layer and (v.head == "finetune" or v.finetune):
        raise ValueError(
            f"LAYER={v.layer} applies to the features of BACKBONES, not to fine-tuning, which "
            "cuts the backbone at its blocks (BLOCKS). Leave LAYER empty with HEAD=finetune."
        )
    if not _LAYER_NAME.fullmatch(v.layer):
        raise ValueError(f"LAYER must be a Keras layer name. Received: {v.layer!r}")


def plan(v: Variables) -> list[str]:
    """Make syntax: variables for the Makefile's rules and one rule per feature file."""
    _check(v)
    names = backbones.expand_names(v.backbones)
    sizes = {name: backbones.input_size(name) for name in names}
    ft_size = backbones.input_size(v.backbone)
    if v.finetune:
        sizes.setdefault(v.backbone, ft_size)
    settings = {
        "weights": v.weights,
        "precision": v.precision,
        "tta": v.tta,
        "folds": int(v.folds),
        "seed": int(v.seed),
    }
    feature_kw = {"weights": v.weights, "precision": v.precision, "tta": v.tta}

    def feature_file(name: str, layer: str = "") -> str:
        return _relative(config.feature_path(v.data_dir, name, layer=layer, **feature_kw))

    def arrays(name: str) -> str:
        size = sizes.get(name, ft_size)
        return _relative(config.arrays_dir(v.data_dir, size))

    models = config.models_dir(v.data_dir)
    ft_head_run = _relative(models / config.head_run_name([v.backbone], v.ft_head, **settings))
    hp = {key: value for key, value in v.hyperparameters.items() if value}
    ft_run = config.finetune_run_name(v.backbone, int(v.blocks), v.augment, hp, **settings)
    if v.head == "finetune":
        run, head_features = ft_run, [feature_file(v.backbone)]
    else:
        run = config.head_run_name(names, v.head, layer=v.layer, **settings)
        head_features = [feature_file(name, v.layer) for name in names]
    lines = [
        f"DS := {config.dataset_key(v.data_dir)}",
        f"SIZES := {' '.join(str(s) for s in sorted(set(sizes.values())))}",
        f"ARRAY_DIRS := {' '.join(sorted({arrays(name) for name in sizes}))}",
        f"BACKBONE_NAMES := {' '.join(names)}",
        f"FEATURE_FILES := {' '.join(head_features)}",
        f"RUN_DIR := {_relative(models / run)}",
        f"SUBMISSION_FILE := {_relative(config.submission_path(v.data_dir, run, v.clip))}",
        f"FT_HEAD_RUN := {ft_head_run}",
        f"FT_HEAD_FEATURES := {feature_file(v.backbone)}",
        f"FT_RUN_DIR := {_relative(models / ft_run)}",
        f"FT_ARRAYS := {arrays(v.backbone)}",
        f"FT_FLAGS := {' '.join(_flag(key, value) for key, value in hp.items())}",
        f"TRAIN_VERSION := {_relative(config.method_version_file('train'))}",
        f"FINETUNE_VERSION := {_relative(config.method_version_file('finetune'))}",
    ]
    rules = {feature_file(name, v.layer): (name, v.layer) for name in names}
    rules.setdefault(feature_file(v.backbone), (v.backbone, ""))  # fine-tuning's head reads it
    for path, (name, layer) in rules.items():
        lines += _feature_rule(path, name, arrays(name), layer)
    return lines


def _flag(keyword: str, value: str) -> str:
    return "--" + keyword.replace("_", "-") + " " + value


def _feature_rule(path: str, backbone: str, arrays: str, layer: str) -> list[str]:
    """A feature file's prerequisite (its arrays) and what its recipe needs to know."""
    tta = "flip" if path.endswith(".flip.h5") else "none"
    return [
        f"{path}: {arrays}/manifest.json",
        f"{path}: EXTRACT_BACKBONE := {backbone}",
        f"{path}: EXTRACT_TTA := {tta}",
        f"{path}: EXTRACT_ARRAYS := {arrays}",
        f"{path}: EXTRACT_LAYER := {layer}",
    ]


def as_make(v: Variables) -> str:
    """The plan on one line (LINE_BREAK between lines); a bad value becomes PLAN_ERROR, which
    the Makefile reports for the targets that need a plan."""
    try:
        lines = plan(v)
    except (ValueError, OSError) as error:
        lines = [f"PLAN_ERROR := {' '.join(str(error).split())}"]
    return LINE_BREAK.join(line.replace("$", "$$") for line in lines)
