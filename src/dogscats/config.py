"""Paths and constants, defined once. Stage modules import these names; none hard-codes a path."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = PROJECT_ROOT / "data"
FEATURES_DIR = PROJECT_ROOT / "features"
SUBMISSIONS_DIR = PROJECT_ROOT / "submissions"

SEED = 2017
COMPETITION = "dogs-vs-cats-redux-kernels-edition"
DOG, CAT = 1, 0
HEADS = ("logreg", "keras", "zeroshot")
# Lower out-of-fold (0.0227 vs 0.0231) and test (0.0199 vs 0.0218) log loss than the Keras head
# for the offline ensemble with TTA=flip on the shared sample (README has the numbers);
# deterministic, and its `make train` needs no TensorFlow.
DEFAULT_HEAD = "logreg"


def dataset_key(data_dir: str | os.PathLike) -> str:
    """Name of a dataset's output folder: the folder name plus a hash of its absolute path.

    Two DATA_DIRs never share arrays, features or models, even when their folder names match.
    The Makefile computes the same key with `sha1sum` (a test keeps the two in step), so it must
    stay `os.path.abspath` (no symlink resolution), exactly like make's `$(abspath ...)`.
    """
    absolute = os.path.abspath(os.fspath(data_dir))
    digest = hashlib.sha1(absolute.encode()).hexdigest()[:8]
    return f"{os.path.basename(absolute)}-{digest}"


def dataset_dir(data_dir: str | os.PathLike, features_root: Path = FEATURES_DIR) -> Path:
    """Root of everything derived from one DATA_DIR: arrays, feature files, fold models."""
    return Path(features_root) / dataset_key(data_dir)


def arrays_dir(data_dir: str | os.PathLike, size: int, features_root: Path = FEATURES_DIR) -> Path:
    """Folder of the uint8 image arrays at one input size."""
    return dataset_dir(data_dir, features_root) / "arrays" / str(size)


def submissions_dir(data_dir: str | os.PathLike, root: Path = SUBMISSIONS_DIR) -> Path:
    return Path(root) / dataset_key(data_dir)
