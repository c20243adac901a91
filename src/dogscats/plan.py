"""What `make` builds for a set of variables: every output path and rule, from config's names.

The Makefile calls `python -m dogscats.cli plan ...` once per invocation and evaluates the
make syntax it prints, so the names of arrays, feature files, runs and submissions have one
owner (config.py). Standard library only: it answers before the venv exists, in milliseconds.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from dogscats import backbones, config, runs, store

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
    devices: str = "auto"
    folds: str = str(config.FOLDS)
    seed: str = str(config.SEED)
    clip: str = "auto"
    backbone: str = "efficientnet_lite0"
    blocks: str = "1"
    augment: str = "flip"
    ft_head: str = config.DEFAULT_HEAD
    norm: str = config.DEFAULT_NORM  # logreg's input normalisation (HEAD=logreg only)
    exclude: str = ""  # a list of train files left out of the head's fits (exclude.py)
    runs: str = ""  # make blend: run names or folders; empty = every finished run
    weights_dir: str = ""  # offline Keras weights (exported to the stages)
    submission: str = ""  # make score's file, when given (else the plan's SUBMISSION_FILE)
    labels: str = ""  # make score's and report's labels, when given
    batch_size: str = "32"
    workers: str = ""  # empty: all cores
    no_wait: str = ""  # 1: a stage refuses, rather than waits, when another run holds its lock
    runtime: str = "auto"  # what runs the forward passes (litert.py)
    layer: str = ""  # pool this layer of each of BACKBONES instead of its output
    ft_backbones: str = "offline"  # make best: the backbones it fine-tunes, BLOCKS top blocks each
    # make best: a second frozen run, of these backbones (empty: none); the Lite models at about
    # 1.75x their native size, whose errors differ enough from the 1.27x run's to pay in the blend
    best_frozen: str = "offline_large"
    finetune: bool = False  # HEAD=finetune or `make finetune`: BACKBONE's arrays are needed
    best: bool = False  # `make best`: the fine-tuned runs and the blend it makes are named
    hyperparameters: dict[str, str] = field(default_factory=dict)  # FT_* set on the command line


# The plain string fields: one `--name` flag each on `dogscats.cli plan`.
MAKE_VARIABLES = tuple(
    f.name for f in fields(Variables) if f.name not in ("finetune", "best", "hyperparameters")
)


def _relative(path: Path) -> str:
    """Paths as make sees them from the project root (where the Makefile runs)."""
    try:
        return str(path.relative_to(config.PROJECT_ROOT))
    except ValueError:
        return str(path)


def _check(v: Variables) -> None:
    """Every make variable, checked before any work: a bad one stops make in its first second
    with the valid values. The one place of these checks (the stages re-check only what they
    are called with directly)."""
    _check_paths(v)
    for name, value, choices in (
        ("HEAD", v.head, (*config.HEADS, "finetune")),
        ("FT_HEAD", v.ft_head, config.HEADS),
        ("TTA", v.tta, config.TTAS),
        ("NORM", v.norm, config.NORMALISATIONS),
        ("PRECISION", v.precision, config.PRECISIONS),
        ("AUGMENT", v.augment, config.AUGMENTS),
        ("RUNTIME", v.runtime, config.RUNTIMES),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}. Received: {value!r}")
    for name, value, least in (
        ("FOLDS", v.folds, 2),
        ("SEED", v.seed, 0),
        ("BLOCKS", v.blocks, 1),
        ("BATCH_SIZE", v.batch_size, 1),
        ("WORKERS", v.workers or "1", 1),
    ):
        if not value.isdigit() or int(value) < least:
            raise ValueError(f"{name} must be a whole number >= {least}. Received: {value!r}")
    if v.no_wait not in ("", "0", "1"):
        raise ValueError(f"NO_WAIT must be 1 (refuse), 0 or empty (wait). Received: {v.no_wait!r}")
    check_clip(v.clip)
    _check_weights(v.weights)
    _check_hyperparameters(v.hyperparameters)
    config.parse_devices(v.devices)
    if v.exclude and not os.path.isfile(v.exclude):
        raise ValueError(
            f"EXCLUDE={v.exclude}: no such file. Give a list of train file names, one per "
            "line, e.g. EXCLUDE=lists/mislabelled-train.txt"
        )
    _check_folds_fit(v.data_dir, int(v.folds))
    if v.layer and (v.head == "finetune" or v.finetune):
        raise ValueError(
            f"LAYER={v.layer} applies to the features of BACKBONES, not to fine-tuning, which "
            "cuts the backbone at its blocks (BLOCKS). Leave LAYER empty with HEAD=finetune."
        )
    if v.runtime == "litert" and v.precision != "float32":
        raise ValueError(
            f"RUNTIME=litert runs float32 exports; PRECISION={v.precision} needs RUNTIME=keras "
            "(or auto, which then picks keras)."
        )
    if not _LAYER_NAME.fullmatch(v.layer):
        raise ValueError(f"LAYER must be a Keras layer name. Received: {v.layer!r}")


# Paths that make itself reads (targets, prerequisites, wildcards) or that recipes pass
# unquoted: make splits them at spaces and reads : ; # = % ( ) * ? [ ] \\ | as its own syntax,
# the shell reads ' " ` $ & < > ! { } and more. Only these characters pass.
_MAKE_SAFE_EXTRAS = "._-+@~/,"
# Paths that recipes pass only inside single quotes (the Makefile's quoting): all but a quote.
_QUOTED_UNSAFE = "'\n\r"


def _check_paths(v: Variables) -> None:
    """Every path variable, checked for characters make and the shell cannot carry, before
    anything else reads it: one line names the variable and the character."""
    folder_name = os.path.basename(os.path.abspath(v.data_dir))  # in every output's path
    strict = [("DATA_DIR", v.data_dir), ("DATA_DIR", folder_name)]
    strict += [("RUNS", run) for run in v.runs.split()] + [("LABELS", v.labels)]
    strict += [] if v.weights in config.WEIGHT_MODES else [("WEIGHTS", v.weights)]
    for name, value in strict:
        _refuse_unsafe(name, value, lambda c: not (c.isalnum() or c in _MAKE_SAFE_EXTRAS))
    # Backbone names are passed unquoted too; a source's prefix (hub:, savedmodel:) has a colon.
    backbone_names = [("BACKBONES", name) for name in v.backbones.split()]
    backbone_names += [("FT_BACKBONES", name) for name in v.ft_backbones.split()]
    backbone_names += [("BEST_FROZEN", name) for name in v.best_frozen.split()]
    for name, value in [*backbone_names, ("BACKBONE", v.backbone)]:
        _refuse_unsafe(name, value, lambda c: not (c.isalnum() or c in _MAKE_SAFE_EXTRAS + ":"))
    for name, value in (
        ("EXCLUDE", v.exclude),
        ("SUBMISSION", v.submission),
        ("WEIGHTS_DIR", v.weights_dir),
    ):
        _refuse_unsafe(name, value, lambda c: c in _QUOTED_UNSAFE, quoted=True)


def _refuse_unsafe(
    name: str, value: str, unsafe: Callable[[str], bool], quoted: bool = False
) -> None:
    bad = next((c for c in value if unsafe(c)), None)
    if bad is None:
        return
    allowed = f"Use letters, digits and {' '.join(_MAKE_SAFE_EXTRAS)} only"
    raise ValueError(
        f"{name}={value}: the character {_shown(bad)} cannot be carried by make and the shell "
        f"in a path. {'Leave it out' if quoted else allowed}: rename the folder or file, or "
        "link it from such a path."
    )


def _shown(character: str) -> str:
    """A character named so that no quoting can hide it: `' (U+0027)`, `space (U+0020)`."""
    code = f"U+{ord(character):04X}"
    if character == " ":
        return f"space ({code})"
    return f"{character} ({code})" if character.isprintable() else code


def check_clip(clip: str) -> float | None:
    """CLIP as a number (None for `auto`). Predictions are clipped to [c, 1 - c], so c must lie
    strictly between 0 (no clipping) and 0.5 (every label 0.5); the submission stage calls this
    too."""
    if clip == "auto":
        return None
    try:
        value = float(clip)
    except ValueError:
        value = math.nan
    if not 0 < value < 0.5:  # NaN fails too
        raise ValueError(
            "CLIP must be 'auto' or a number in (0, 0.5), e.g. 0.005: labels are clipped to "
            f"[CLIP, 1 - CLIP]. Received: {clip!r}"
        )
    return value


def _check_weights(weights: str) -> None:
    if weights not in config.WEIGHT_MODES and not os.path.isfile(weights):
        raise ValueError(
            f"WEIGHTS must be one of {', '.join(config.WEIGHT_MODES)} or the path of a weights "
            f"file. Received: {weights!r} (no such file)"
        )


# What each FT_* value must be, and how the error says it; every other one must be > 0.
_FT_BOUNDS: dict[str, tuple[Callable[[float], bool], str]] = {
    "dropout": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "stop_fraction": (lambda x: 0 < x < 1, "in (0, 1)"),  # both sides need rows
}


def _check_hyperparameters(given: dict[str, str]) -> None:
    """FT_* values: each must parse as its kind and be positive (the shares below 1)."""
    for keyword, _, kind, what, make_name in config.FINETUNE_HYPERPARAMETERS:
        value = given.get(keyword) or ""
        if not value:
            continue
        try:
            number = kind(value)
        except ValueError:
            number = math.nan
        within, bound = _FT_BOUNDS.get(keyword, (lambda x: x > 0, "> 0"))
        if not within(number):
            kind_text = "a whole number" if kind is int else "a number"
            raise ValueError(
                f"{make_name} ({what}) must be {kind_text} {bound}. Received: {value!r}"
            )


def _check_folds_fit(data_dir: str, folds: int) -> None:
    """Stratified K-fold needs every class to have at least K images. Counted from the train
    folder's names (about 20 ms for 25,000 files: no stat); skipped while the folder is absent."""
    try:
        names = [entry.name for entry in os.scandir(os.path.join(data_dir, "train"))]
    except OSError:
        return
    counts = {"cat": 0, "dog": 0}
    for name in names:
        match = config.TRAIN_NAME.fullmatch(name)
        if match:
            counts[match.group(1)] += 1
    smallest = min(counts.values())
    if smallest and folds > smallest:
        raise ValueError(
            f"FOLDS={folds} is more than the {smallest} images of the smaller class in "
            f"{data_dir}/train (cats {counts['cat']}, dogs {counts['dog']}): stratified "
            f"cross-validation needs 2 <= FOLDS <= {smallest}"
        )


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
    # NORM is logreg's; fine-tuning starts from a head that is one Dense layer: "standard".
    head_norm = v.norm if v.head == "logreg" else "standard"
    ft_head_run_name = config.head_run_name([v.backbone], v.ft_head, **settings)
    ft_head_run = _relative(models / ft_head_run_name)
    hp = {key: value for key, value in v.hyperparameters.items() if value}
    ft_run = config.finetune_run_name(v.backbone, int(v.blocks), v.augment, hp, **settings)

    def frozen_run(backbone_names: list[str]) -> str:
        return config.head_run_name(
            backbone_names,
            v.head,
            exclude=v.exclude,
            normalise=head_norm,
            layer=v.layer,
            **settings,
        )

    if v.head == "finetune":
        run, head_features = ft_run, [feature_file(v.backbone)]
    else:
        run = frozen_run(names)
        head_features = [feature_file(name, v.layer) for name in names]
    lines = [
        f"DS := {config.dataset_key(v.data_dir)}",
        f"SOURCES_STAMP := {_relative(config.sources_stamp(v.data_dir))}",
        f"SIZES := {' '.join(str(s) for s in sorted(set(sizes.values())))}",
        f"ARRAY_DIRS := {' '.join(sorted({arrays(name) for name in sizes}))}",
        f"BACKBONE_NAMES := {' '.join(names)}",
        f"FEATURE_FILES := {' '.join(head_features)}",
        f"RUN_DIR := {_relative(models / run)}",
        f"SUBMISSION_FILE := {_relative(config.submission_path(v.data_dir, run, v.clip))}",
        f"REPORT_FILE := {_relative(config.report_path(v.data_dir))}",
        f"FT_HEAD_RUN := {ft_head_run}",
        f"FT_HEAD_FEATURES := {feature_file(v.backbone)}",
        f"FT_RUN_DIR := {_relative(models / ft_run)}",
        f"FT_ARRAYS := {arrays(v.backbone)}",
        f"FT_FLAGS := {' '.join(_flag(key, value) for key, value in hp.items())}",
        f"TRAIN_VERSION := {_relative(config.method_version_file('train'))}",
        f"FINETUNE_VERSION := {_relative(config.method_version_file('finetune'))}",
        f"EXCLUDE_FILE := {v.exclude}",
        f"HEAD_NORM := {head_norm}",
        f"LOCK_FLAGS := {'--no-wait' if v.no_wait == '1' else ''}",
        *_blend_lines(v, models),
        *(_best_lines(v, models, run, frozen_run, settings, hp) if v.best else []),
    ]
    readers: dict[str, list[str]] = {}  # arrays folder -> the backbones that read it
    for name in sizes:
        readers.setdefault(arrays(name), []).append(name)
    for folder, users in sorted(readers.items()):
        lines.append(f"{folder}/manifest.json: ARRAYS_BACKBONES := {' '.join(users)}")
    # A finished run that lacks a file it wrote (a fold model deleted) is not up to date:
    # make calls its stage, whose runs.up_to_date says so and redoes it.
    for folder in sorted({models / run, models / ft_run, models / ft_head_run_name}):
        if runs.missing_files(folder):
            lines.append(f"{_relative(runs.metrics_path(folder))}: FORCE")
    rules = {feature_file(name, v.layer): (name, v.layer) for name in names}
    rules.setdefault(feature_file(v.backbone), (v.backbone, ""))  # fine-tuning's head reads it
    for path, (name, layer) in rules.items():
        ahead = [other for other in names if other != name] if name in names else []
        lines += _feature_rule(path, name, arrays(name), layer, ahead)
    return lines


def _blend_lines(v: Variables, models: Path) -> list[str]:
    """`make blend`: the runs (RUNS, names or folders; default every finished run but those
    made with WEIGHTS=random, which BLEND_LEFT_OUT names), the blend's run folder and
    submission."""
    given = [Path(r) if "/" in r else models / r for r in v.runs.split()]
    finished = [] if given else config.finished_runs(v.data_dir)
    # WEIGHTS=random runs are dry runs: only a blend that names them takes them.
    left_out = [p for p in finished if config.random_weights_run(p)]
    run_dirs = given or [p for p in finished if p not in left_out]
    folder, submission = _blend_outputs(v, models, [p.name for p in run_dirs])
    return [
        f"BLEND_RUN_DIRS := {' '.join(_relative(p) for p in run_dirs)}",
        f"BLEND_LEFT_OUT := {' '.join(p.name for p in left_out)}",
        f"BLEND_DIR := {folder}",
        f"BLEND_SUBMISSION := {submission}",
        f"BLEND_VERSION := {_relative(config.method_version_file('blend'))}",
    ]


def _blend_outputs(v: Variables, models: Path, run_names: list[str]) -> tuple[str, str]:
    """The run folder and the submission of the blend of these runs, as make sees them."""
    name = config.blend_run_name(run_names)
    return _relative(models / name), _relative(config.submission_path(v.data_dir, name, v.clip))


def _best_lines(
    v: Variables,
    models: Path,
    run: str,
    frozen_run: Callable[[list[str]], str],
    settings: dict,
    hp: dict,
) -> list[str]:
    """`make best`: the backbones it fine-tunes, the runs it blends (the frozen run of these
    variables first, then the frozen run of BEST_FROZEN, then each fine-tuned one) and that
    blend's folder and submission."""
    if v.head == "finetune":
        raise ValueError(
            "make best fits the frozen head of BACKBONES itself, then fine-tunes each of "
            "FT_BACKBONES: give HEAD a frozen head (logreg, keras, ...), not finetune."
        )
    if not v.ft_backbones.split():
        raise ValueError("FT_BACKBONES is empty: name the backbones make best fine-tunes.")
    names = backbones.expand_names(v.ft_backbones)
    ft_runs = [
        config.finetune_run_name(name, int(v.blocks), v.augment, hp, **settings) for name in names
    ]
    frozen_names = backbones.expand_names(v.best_frozen) if v.best_frozen.split() else []
    if frozen_names and frozen_run(frozen_names) == run:
        frozen_names = []  # BEST_FROZEN names BACKBONES' run: one frozen run
    second = [frozen_run(frozen_names)] if frozen_names else []
    blended = [run, *second, *ft_runs]
    folder, submission = _blend_outputs(v, models, blended)
    return [
        f"BEST_FROZEN_BACKBONES := {' '.join(frozen_names)}",
        f"BEST_FT_BACKBONES := {' '.join(names)}",
        f"BEST_RUNS := {' '.join(blended)}",
        f"BEST_BLEND_DIR := {folder}",
        f"BEST_SUBMISSION := {submission}",
    ]


def _flag(keyword: str, value: str) -> str:
    return "--" + keyword.replace("_", "-") + " " + value


def _feature_rule(
    path: str, backbone: str, arrays: str, layer: str, ahead: list[str]
) -> list[str]:
    """A feature file's prerequisite (its arrays) and what its recipe needs to know; `ahead`:
    the run's other backbones, exported for LiteRT by whichever extraction starts Keras."""
    tta = "flip" if path.endswith(".flip.h5") else "none"
    return [
        f"{path}: {arrays}/manifest.json",
        f"{path}: EXTRACT_BACKBONE := {backbone}",
        f"{path}: EXTRACT_TTA := {tta}",
        f"{path}: EXTRACT_ARRAYS := {arrays}",
        f"{path}: EXTRACT_LAYER := {layer}",
        f"{path}: EXTRACT_AHEAD := {' '.join(ahead)}",
    ]


def as_make(v: Variables) -> str:
    """The plan on one line (LINE_BREAK between lines); a bad value becomes PLAN_ERROR, which
    the Makefile reports for the targets that need a plan."""
    try:
        lines = plan(v)
    except (ValueError, OSError) as error:
        # One line, quoted safely: the Makefile echoes it inside double quotes, and evaluates
        # it as make syntax (# would start a comment there, ;; a new line).
        message = " ".join(str(error).split()).translate({ord("`"): "'", ord('"'): "'"})
        message = message.replace("#", "\\#").replace(LINE_BREAK, "; ;")
        lines = [f"PLAN_ERROR := {message}"]
    return LINE_BREAK.join(line.replace("$", "$$") for line in lines)


# ----------------------------------------------------------------------------------------------
# The sources stamp: what make's rule for the arrays depends on


def scan_sources(data_dir: str | os.PathLike) -> tuple[dict, int] | None:
    """Every file of DATA_DIR/train and /test with its size and mtime (ns), summed up as one
    digest per split, and the newest mtime seen (folders included); None while a folder is
    missing. Standard library only (README has its cost)."""
    scan, newest = {}, 0
    for split in ("train", "test"):
        folder = os.path.join(data_dir, split)
        try:
            entries = list(os.scandir(folder))
            newest = max(newest, os.stat(folder).st_mtime_ns)
        except OSError:
            return None
        lines = []
        for entry in sorted(entries, key=lambda e: e.name):
            if config.hidden_file(entry.name):
                continue  # as the stages' listing: a .DS_Store appearing redoes nothing
            stat = _stat(entry)
            newest = max(newest, stat.st_mtime_ns)
            lines.append(f"{entry.name}\t{stat.st_size}\t{stat.st_mtime_ns}")
        scan[split] = {"files": len(lines), "digest": store.digest("\n".join(lines))}
    return scan, newest


def _stat(entry: os.DirEntry) -> os.stat_result:
    """The file's stat; a dangling symlink's own (preprocessing reports it by name)."""
    try:
        return entry.stat()
    except OSError:
        return entry.stat(follow_symlinks=False)


def refresh_sources_stamp(
    data_dir: str | os.PathLike, stamp: str | os.PathLike, wait: bool = True
) -> bool:
    """Rewrite `stamp` only when the scan differs from the one it holds, so that its mtime
    changes exactly when an image is added, removed or replaced (in place too). True when it
    was rewritten. A missing folder leaves the stamp alone (`make data` comes first).

    A first stamp (none before, e.g. arrays made by an older version) gets the newest mtime of
    the sources rather than now: make then redoes the arrays only if a source changed after
    them, instead of once more for nothing.
    """
    found = scan_sources(data_dir)
    if found is None:
        return False
    with store.writer_lock(Path(stamp).parent, "sources", wait):  # two makes write one stamp
        return _refresh_stamp(data_dir, stamp, found)


def _refresh_stamp(data_dir: str | os.PathLike, stamp: str | os.PathLike, found: tuple) -> bool:
    scan, newest = found
    wanted = {"data_dir": os.path.abspath(data_dir), **scan}
    before = store.read_json(stamp)
    if before == wanted:
        return False
    store.write_json(stamp, wanted)
    if before is None:
        os.utime(stamp, ns=(newest, newest))
    return True
