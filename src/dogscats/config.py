"""Constants, choices, and every derived path and name, defined once.

Stage modules and the Makefile (through `dogscats.cli plan`) take their paths and names from
here; none builds one by hand. Standard library only: `make` imports this on every call.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from dogscats import store

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = PROJECT_ROOT / "data"
FEATURES_DIR = PROJECT_ROOT / "features"
SUBMISSIONS_DIR = PROJECT_ROOT / "submissions"
REPORTS_DIR = PROJECT_ROOT / "reports"

SEED = 2017
FOLDS = 5
COMPETITION = "dogs-vs-cats-redux-kernels-edition"
DOG, CAT = 1, 0
HEADS = ("logreg", "keras", "zeroshot")
# README's quality table has the comparison that made logreg the default.
DEFAULT_HEAD = "logreg"
TTAS = ("none", "flip")
# How the logreg head normalises its inputs (heads.LogisticHead): "standard" standardises every
# feature, "ssr_l2" takes the signed square root and L2-normalises each backbone's block first.
# README's lever table has the comparison that made ssr_l2 the default of `make` (NORM).
NORMALISATIONS = ("standard", "ssr_l2")
DEFAULT_NORM = "ssr_l2"
PRECISIONS = ("float32", "bfloat16")
WEIGHT_MODES = ("imagenet", "random")  # or the path of a weights file
AUGMENTS = ("flip", "full")
# What runs the forward passes (litert.py): Keras's compiled step, or a LiteRT export of it;
# auto = litert on a CPU under TensorFlow where the export matches Keras, else keras.
RUNTIMES = ("auto", "keras", "litert")
# Kaggle's file names: train/cat.N.jpg, train/dog.N.jpg (label from the name), test/N.jpg (id).
TRAIN_NAME = re.compile(r"(cat|dog)\.(\d+)\.jpg")
TEST_NAME = re.compile(r"(\d+)\.jpg")


def hidden_file(name: str) -> bool:
    """Hidden files (.DS_Store, macOS's ._N.jpg, editors' swap files) are no competition
    images: every listing of train/ and test/ (the stages' and make's stamp) skips them."""
    return name.startswith(".")


REPORT_IMAGES = 48  # make report's K: thumbnails per gallery

DEVICES_HELP = "auto (every accelerator, else the CPU), cpu, or a number of devices"


def parse_devices(value: str) -> str | int:
    """DEVICES as given to make: 'auto', 'cpu' or a positive count."""
    value = str(value).strip().lower()
    if value in ("auto", "cpu"):
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"DEVICES must be {DEVICES_HELP}. Received: {value!r}")


# ----------------------------------------------------------------------------------------------
# Folders


def dataset_key(data_dir: str | os.PathLike) -> str:
    """Name of a dataset's output folder: the folder name plus a hash of its absolute path.

    Two DATA_DIRs never share arrays, features or models, even when their folder names match.
    `os.path.abspath` (no symlink resolution), as make's `$(abspath ...)` would see it.
    """
    absolute = os.path.abspath(os.fspath(data_dir))
    digest = hashlib.sha1(absolute.encode()).hexdigest()[:8]
    return f"{os.path.basename(absolute)}-{digest}"


def dataset_dir(data_dir: str | os.PathLike, features_root: Path = FEATURES_DIR) -> Path:
    """Root of everything derived from one DATA_DIR: arrays, feature files, fold models."""
    return Path(features_root) / dataset_key(data_dir)


def arrays_root(data_dir: str | os.PathLike, features_root: Path = FEATURES_DIR) -> Path:
    """Folder of the arrays folders, one per input size."""
    return dataset_dir(data_dir, features_root) / "arrays"


def arrays_dir(data_dir: str | os.PathLike, size: int, features_root: Path = FEATURES_DIR) -> Path:
    """Folder of the uint8 image arrays at one input size."""
    return arrays_dir_in(dataset_dir(data_dir, features_root), size)


ARRAYS_MANIFEST = "manifest.json"  # marks a complete arrays folder (arrays/stage.py)


def arrays_dir_in(dataset: str | os.PathLike, size: int) -> Path:
    """arrays_dir, from a data set's output folder (dataset_dir) rather than its DATA_DIR:
    where the arrays of a feature file found in that folder lie."""
    return Path(dataset) / "arrays" / str(size)


def sources_stamp(data_dir: str | os.PathLike, features_root: Path = FEATURES_DIR) -> Path:
    """make's view of the source images: rewritten only when a file's name, size or mtime
    changes (`dogscats.cli sources`), so the arrays' rule sees images replaced in place."""
    return sources_stamp_in(dataset_dir(data_dir, features_root))


def sources_stamp_in(dataset: str | os.PathLike) -> Path:
    """sources_stamp, from a data set's output folder (dataset_dir)."""
    return Path(dataset) / "sources.json"


def models_dir(data_dir: str | os.PathLike, features_root: Path = FEATURES_DIR) -> Path:
    """Folder of the run folders (one per head or fine-tuning run)."""
    return dataset_dir(data_dir, features_root) / "models"


def cut_cache_dir(data_dir: str | os.PathLike, features_root: Path = FEATURES_DIR) -> Path:
    """Folder of fine-tuning's cached feature maps at the cut."""
    return dataset_dir(data_dir, features_root) / "cut_cache"


def submissions_dir(data_dir: str | os.PathLike, root: Path = SUBMISSIONS_DIR) -> Path:
    return Path(root) / dataset_key(data_dir)


def reports_dir(data_dir: str | os.PathLike, root: Path = REPORTS_DIR) -> Path:
    """Folder of a dataset's report page and the lists written beside it."""
    return Path(root) / dataset_key(data_dir)


def report_path(data_dir: str | os.PathLike, root: Path = REPORTS_DIR) -> Path:
    return reports_dir(data_dir, root) / "index.html"


def most_wrong_path(report: str | os.PathLike) -> Path:
    """The report's most-wrong train files, one per line: an EXCLUDE= file once reviewed."""
    return Path(report).with_name("most_wrong.txt")


# ----------------------------------------------------------------------------------------------
# Names: feature files, runs, submissions


def backbone_stem(backbone: str) -> str:
    """A backbone name as it appears in file and run names. Registered names stay as they are;
    a source name (`hub:<preset>`, `savedmodel:<dir>:<size>`) becomes `hub-dinov2_base`, or for
    a folder its last part and a hash of the absolute name, so two folders never share a file.
    """
    prefix, colon, rest = backbone.partition(":")
    if not colon:
        return backbone
    if re.fullmatch(r"[A-Za-z0-9_.-]+", rest) and not os.path.isdir(rest):
        return f"{prefix}-{rest}"
    where = rest if "://" in rest else os.path.abspath(os.path.expanduser(rest))
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", rest.rstrip("/").rsplit("/", 1)[-1]).strip("_")
    return f"{prefix}-{base}-{hashlib.sha1(where.encode()).hexdigest()[:8]}"


def layer_stem(backbone: str, layer: str | None = None) -> str:
    """`vgg16@block4_pool` when features come from an inner layer, else the backbone's stem."""
    return backbone_stem(backbone) + (f"@{layer}" if layer else "")


def feature_tag(weights: str = "imagenet", precision: str = "float32", tta: str = "none") -> str:
    """Suffix naming the settings that change a backbone's features, e.g. `.bf16.flip`."""
    tag = ".random" if weights == "random" else ""
    tag += ".bf16" if precision == "bfloat16" else ""
    return tag + (".flip" if tta == "flip" else "")


def feature_path(
    data_dir: str | os.PathLike,
    backbone: str,
    weights: str = "imagenet",
    precision: str = "float32",
    tta: str = "none",
    features_root: Path = FEATURES_DIR,
    layer: str | None = None,
) -> Path:
    """The feature file of one backbone (`<backbone>[@<layer>]<tag>.h5`). A file with mirrored
    features also holds the plain ones, so for tta="none" an existing `.flip` file is the answer
    (never extracted twice)."""
    folder = dataset_dir(data_dir, features_root)
    stem = layer_stem(backbone, layer)
    if tta == "none":
        flipped = folder / f"{stem}{feature_tag(weights, precision, 'flip')}.h5"
        if flipped.is_file():
            return flipped
    return folder / f"{stem}{feature_tag(weights, precision, tta)}.h5"


def settings_suffix(
    weights: str = "imagenet",
    precision: str = "float32",
    tta: str = "none",
    folds: int = FOLDS,
    seed: int = SEED,
) -> str:
    """The part of a run name for settings off their defaults, e.g. `__bf16__flip__folds10`."""
    suffix = feature_tag(weights, precision, tta).replace(".", "__")
    suffix += f"__folds{folds}" if int(folds) != FOLDS else ""
    return suffix + (f"__seed{seed}" if int(seed) != SEED else "")


def feature_backbone(feature_file: str | os.PathLike) -> str:
    """The backbone a feature file holds: its name up to the settings tag (feature_tag)."""
    return Path(feature_file).name.split(".", 1)[0]


def head_run_name(
    backbones: list[str],
    head: str,
    exclude: str = "",
    normalise: str = "standard",
    layer: str | None = None,
    **settings,
) -> str:
    """e.g. `efficientnet_lite0+efficientnet_lite1__logreg__flip`, `vgg16@block4_pool__logreg`;
    a normalisation other than "standard" adds its name (`__ssr_l2`), an EXCLUDE list its
    file's stem and a digest of its content (`__excl-mislabelled-train-1a2b3c4d`)."""
    stems = "+".join(layer_stem(name, layer) for name in backbones)
    norm = "" if normalise == "standard" else f"__{normalise}"
    suffix = f"{settings_suffix(**settings)}{norm}{exclude_suffix(exclude)}"
    return f"{stems}__{head}{suffix}"


def exclude_suffix(exclude: str | os.PathLike = "") -> str:
    """The run name's part for an EXCLUDE list: its stem for people, the digest of its content
    for identity, so that two lists of one file name (or one list edited) never share a run."""
    if not exclude:
        return ""
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(exclude).stem)
    return f"__excl-{stem}-{file_digest(exclude)[:8]}"


def file_digest(path: str | os.PathLike) -> str:
    """The digest of a file's content (store.digest of its bytes): what names and settings
    record of an input file, so that its identity is what it holds, not where it lies."""
    return store.digest(Path(path).read_bytes())


BLEND_PREFIX = "blend__"
RUN_METRICS = "metrics.json"  # the file that marks a finished run folder (runs.py)


def blend_run_name(run_names: list[str]) -> str:
    """e.g. `blend__3runs-1a2b3c4d`: the number of runs and a digest of their sorted names."""
    digest = hashlib.sha1("\n".join(sorted(run_names)).encode()).hexdigest()[:8]
    return f"{BLEND_PREFIX}{len(run_names)}runs-{digest}"


# Folders beside finished runs: store.atomic_dir's partial and old ones, fine-tuning's work.
UNFINISHED_SUFFIXES = (".partial", ".old", ".work")


def list_runs(models: str | os.PathLike, blends: bool = True) -> list[Path]:
    """The finished run folders (with metrics.json) in a models folder, by name: no partial,
    old or work folders; blends too unless `blends` is False."""
    folder = Path(models)
    found = folder.glob(f"*/{RUN_METRICS}") if folder.is_dir() else []
    return sorted(
        p.parent
        for p in found
        if p.parent.suffix not in UNFINISHED_SUFFIXES
        and (blends or not p.parent.name.startswith(BLEND_PREFIX))
    )


def finished_runs(data_dir: str | os.PathLike, features_root: Path = FEATURES_DIR) -> list[Path]:
    """The finished runs of a data set that a blend may take: every one but the blends."""
    return list_runs(models_dir(data_dir, features_root), blends=False)


def random_weights_run(run: str | os.PathLike) -> bool:
    """A run made with WEIGHTS=random (its name says so: settings_suffix's `__random`): for
    tests and dry runs, never part of a default blend."""
    return feature_tag("random").lstrip(".") in Path(run).name.split("__")


# The fine-tuning hyperparameters a user may set (make's FT_*, the CLI's flags): keyword, the
# part of the run name it adds when set, its type, what it is, its make variable. Unset ones keep
# the stage's defaults (finetune/hparams.py).
FINETUNE_HYPERPARAMETERS = (
    ("epochs", "ep", int, "most epochs per fold", "FT_EPOCHS"),
    ("learning_rate", "lr", float, "peak Adam learning rate", "FT_LR"),
    ("batch_size", "bs", int, "images per step", "FT_BATCH"),
    (
        "patience",
        "pat",
        int,
        "epochs without a better validation loss before a fold stops",
        "FT_PATIENCE",
    ),
    ("dropout", "drop", float, "dropout before the dense head", "FT_DROPOUT"),
    (
        "stop_fraction",
        "stop",
        float,
        "share of each fold's training rows that decides early stopping and fine-tuned or head",
        "FT_STOP",
    ),
)
FINETUNE_NAME_PARTS = tuple((keyword, part) for keyword, part, *_ in FINETUNE_HYPERPARAMETERS)


def finetune_run_name(
    backbone: str, blocks: int, augment: str, hyperparameters: dict | None = None, **settings
) -> str:
    """e.g. `efficientnet_lite0__finetune1__augflip__lr1e-4__flip`: every hyperparameter set
    away from its default is in the name, so runs with other values sit side by side."""
    given = hyperparameters or {}
    parts = "".join(f"__{part}{given[key]}" for key, part in FINETUNE_NAME_PARTS if key in given)
    stem = backbone_stem(backbone)
    return f"{stem}__finetune{blocks}__aug{augment}{parts}{settings_suffix(**settings)}"


CLIP_PART = "__clip"


def submission_path(data_dir: str | os.PathLike, run: str, clip: str = "auto") -> Path:
    """The submission CSV of a run; a fixed CLIP is part of the name."""
    suffix = "" if clip == "auto" else f"{CLIP_PART}{clip}"
    return submissions_dir(data_dir) / f"{run}{suffix}.csv"


def run_submissions(data_dir: str | os.PathLike, run: str) -> dict[str, Path]:
    """{clip ("auto" or the fixed value): path} of the submission CSVs written for a run."""
    auto = submission_path(data_dir, run)
    found = {"auto": auto} if auto.is_file() else {}
    for path in sorted(submissions_dir(data_dir).glob(f"{run}{CLIP_PART}*.csv")):
        found[path.stem.removeprefix(run + CLIP_PART)] = path
    return found


# ----------------------------------------------------------------------------------------------
# Method versions: one small file per stage whose results a code change can alter. Bump the
# number when such a change lands: make sees the newer file as it sees any newer input, and
# the stage, which records the number in its settings, redoes its finished runs.

VERSIONS_DIR = Path(__file__).resolve().parent / "versions"


def method_version_file(stage: str) -> Path:
    return VERSIONS_DIR / f"{stage}.txt"


def method_version(stage: str) -> int:
    return int(method_version_file(stage).read_text())
