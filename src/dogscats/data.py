"""The raw competition folders: get them in place (`make data`) and list their images.

Kaggle layout under DATA_DIR: train/cat.N.jpg and train/dog.N.jpg, test/N.jpg,
sample_submission.csv. Nothing here writes into DATA_DIR except `ensure_data` (`make data`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from dogscats.config import CAT, COMPETITION, DOG, TEST_NAME, TRAIN_NAME, hidden_file
from dogscats.messages import some_names
from dogscats.store import SPLITS

TRAIN_NAME_REASON = "name does not match cat.N.jpg / dog.N.jpg"
FOLDER_REASON = "a folder, not an image file"
PATTERNS = {"train": "cat.N.jpg / dog.N.jpg", "test": "N.jpg"}
NAMES = {"train": TRAIN_NAME, "test": TEST_NAME}
LABELS = {"cat": CAT, "dog": DOG}


class BadInputError(ValueError):
    """The input folders cannot produce a complete result (e.g. a test image is unusable)."""


class DataMissingError(FileNotFoundError):
    """DATA_DIR lacks the competition files and they could not be fetched."""


# ---------------------------------------------------------------------------------------------
# Scanning


def _split_dir(data_dir: str | os.PathLike, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    folder = Path(data_dir) / split
    if not folder.is_dir():
        raise DataMissingError(
            f"{folder.resolve()} is missing; run `make data` or place the Kaggle {split}/ there"
        )
    return folder


def scan_split(
    data_dir: str | os.PathLike, split: str
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """List one split as a DataFrame (id, label, file) plus (file, reason) rejects.

    train: cat.N.jpg -> label 0, dog.N.jpg -> label 1, id "cat.N"; other names are rejected,
    never guessed at. test: N.jpg -> id N, label -1; any other name raises BadInputError since a
    submission needs exactly the Kaggle ids. Hidden files are skipped. Rows are sorted
    (label, N) / N for a fixed order. `file` is the name inside the split folder.
    """
    folder = _split_dir(data_dir, split)
    with os.scandir(folder) as entries:
        found = {entry.name: _is_folder(entry) for entry in entries if not hidden_file(entry.name)}
    names = sorted(found)
    _check_not_nested(folder, split, names)
    if split == "train":
        return _scan_train(names, {name for name, folder in found.items() if folder})
    return _scan_test(names), []


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _check_not_nested(folder: Path, split: str, names: list[str]) -> None:
    """Some unzip tools leave train/train/*.jpg: name that, rather than "no images"."""
    if any(NAMES[split].fullmatch(name) for name in names):
        return
    inner = folder / split
    try:
        nested = any(NAMES[split].fullmatch(name) for name in os.listdir(inner))
    except OSError:
        return
    if nested:
        raise BadInputError(
            f"{folder} holds no {PATTERNS[split]} images, but {inner} does: the zip was "
            f"unpacked one folder too deep. Move that folder up: mv {folder} {folder}.outer "
            f"&& mv {folder}.outer/{split} {folder} && rmdir {folder}.outer"
        )


def _scan_train(
    names: list[str], folders: set[str] = frozenset()
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    rows, rejects = [], []
    for name in names:
        match = TRAIN_NAME.fullmatch(name)
        if match is None or name in folders:
            rejects.append((name, FOLDER_REASON if name in folders else TRAIN_NAME_REASON))
            continue
        animal, number = match.groups()
        rows.append((LABELS[animal], int(number), name[: -len(".jpg")], name))
    rows.sort()  # by label then number: cat.2 before cat.10
    frame = pd.DataFrame(
        [(ident, label, name) for label, _, ident, name in rows], columns=["id", "label", "file"]
    )
    return frame.astype({"id": str, "label": np.int64, "file": str}), rejects


def _scan_test(names: list[str]) -> pd.DataFrame:
    odd = [name for name in names if TEST_NAME.fullmatch(name) is None]
    if odd:
        raise BadInputError(
            f"test/ holds {len(odd):,} file(s) not named N.jpg (every test file must be a "
            f"Kaggle id; move the others out): {some_names(odd)}"
        )
    ids = sorted((int(name[: -len(".jpg")]), name) for name in names)
    frame = pd.DataFrame([(i, -1, name) for i, name in ids], columns=["id", "label", "file"])
    duplicated = frame.loc[frame["id"].duplicated(keep=False), "file"].tolist()
    if duplicated:
        raise BadInputError(f"test/ holds files with the same id: {some_names(duplicated)}")
    return frame.astype({"id": np.int64, "label": np.int64, "file": str})


# ---------------------------------------------------------------------------------------------
# Getting the data (`make data`)

OUTER_ZIP = f"{COMPETITION}.zip"


def has_data(data_dir: str | os.PathLike) -> bool:
    return all((Path(data_dir) / split).is_dir() for split in SPLITS)


def ensure_data(data_dir: str | os.PathLike) -> Path:
    """Make DATA_DIR hold train/ and test/: already there, from the zips, or via the Kaggle CLI.

    Raises DataMissingError with step-by-step instructions when none of these works.
    """
    root = Path(os.path.abspath(os.fspath(data_dir)))
    if has_data(root):
        print(f"Data present: {root}/train and {root}/test")
        _warn_missing_sample(root)
        return root
    _check_not_a_split_folder(root)
    _check_half_present(root)
    if not _zips_present(root):
        _check_writable(root, "download the competition into it")
        _kaggle_download(root)
    _check_writable(root, f"unzip {OUTER_ZIP} (or train.zip and test.zip) there")
    _extract_zips(root)
    if not has_data(root):
        raise DataMissingError(
            f"The zips under {root} did not produce train/ and test/.\n" + _instructions(root)
        )
    print(f"Data ready: {root}/train and {root}/test")
    _warn_missing_sample(root)
    return root


def _missing_splits(root: Path) -> list[str]:
    return [split for split in SPLITS if not (root / split).is_dir()]


def _check_not_a_split_folder(root: Path) -> None:
    """DATA_DIR set to the train/ or test/ folder itself: name its parent, rather than ask for
    the whole download."""
    if root.name in SPLITS and has_data(root.parent) and not _zips_present(root):
        raise DataMissingError(
            f"DATA_DIR={root} is the competition's {root.name}/ folder: give the folder that "
            f"holds train/ and test/, DATA_DIR={root.parent}"
        )


def _check_half_present(root: Path) -> None:
    """train/ there but test/ not (or the other way round), and no zip for it: name the
    missing folder, rather than ask for the whole download."""
    missing = _missing_splits(root)
    if len(missing) == len(SPLITS) or _zips_present(root):
        return
    (split,) = missing
    there = "test" if split == "train" else "train"
    raise DataMissingError(
        f"{root / split} is missing ({root / there} is there): put the Kaggle {split}/ folder "
        f"({PATTERNS[split]} files) there, or {split}.zip or {OUTER_ZIP} in {root} for "
        "`make data` to unzip"
    )


def _check_writable(root: Path, what: str) -> None:
    """`make data` writes into DATA_DIR only to get the data; say so before trying."""
    folder = root if root.exists() else root.parent
    if not os.access(folder, os.W_OK):
        raise DataMissingError(
            f"{folder} is read-only, so `make data` cannot {what}. Unzip them yourself into a "
            f"writable folder and pass DATA_DIR=<that folder>, or make {folder} writable."
        )


def _warn_missing_sample(root: Path) -> None:
    if not (root / "sample_submission.csv").is_file():
        print(f"Note: {root}/sample_submission.csv is missing; test ids come from test/ names.")


def _zips_present(root: Path) -> bool:
    """The competition zip, or the zip of every split whose folder is missing."""
    return (root / OUTER_ZIP).is_file() or all(
        (root / f"{split}.zip").is_file() for split in _missing_splits(root)
    )


def _extract_zips(root: Path) -> None:
    outer = root / OUTER_ZIP
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        work = Path(tmp)
        missing = _missing_splits(root)
        inner = {split: root / f"{split}.zip" for split in missing}
        if not all(path.is_file() for path in inner.values()) and outer.is_file():
            print(f"Extracting {outer}")
            _safe_extract(outer, work)
            inner = {split: work / f"{split}.zip" for split in missing}
            sample = work / "sample_submission.csv"
            if sample.is_file() and not (root / sample.name).exists():
                os.replace(sample, root / sample.name)
        for split, archive in inner.items():
            if not archive.is_file():
                raise DataMissingError(f"{archive.name} not found.\n" + _instructions(root))
            _extract_split(archive, split, work / f"{split}-files", root / split)


def _extract_split(archive: Path, split: str, work: Path, target: Path) -> None:
    """Extract into a scratch folder, then rename into place, so a crash leaves no half folder."""
    print(f"Extracting {archive} -> {target}")
    _safe_extract(archive, work)
    nested = work / split  # the Kaggle zips hold a top-level train/ or test/ folder
    os.replace(nested if nested.is_dir() else work, target)


def _safe_extract(archive: Path, target: Path) -> None:
    """zipfile.extractall, refusing members that would land outside `target`."""
    target.mkdir(parents=True, exist_ok=True)
    base = target.resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            if not (base / member).resolve().is_relative_to(base):
                raise DataMissingError(f"{archive}: refusing unsafe member path {member!r}")
        zf.extractall(target)


def _kaggle_credentials() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config_dirs = [os.environ.get("KAGGLE_CONFIG_DIR"), "~/.kaggle", "~/.config/kaggle"]
    return any(
        Path(folder).expanduser().joinpath("kaggle.json").is_file()
        for folder in config_dirs
        if folder
    )


def _kaggle_download(root: Path) -> None:
    # The venv's own CLI first: make runs .venv/bin/python without activating the venv.
    beside_python = Path(sys.executable).with_name("kaggle")
    kaggle = str(beside_python) if beside_python.is_file() else shutil.which("kaggle")
    if kaggle is None or not _kaggle_credentials():
        why = "the `kaggle` command is not on PATH" if kaggle is None else "no Kaggle credentials"
        raise DataMissingError(f"No data under {root} and {why}.\n" + _instructions(root))
    root.mkdir(parents=True, exist_ok=True)
    command = [kaggle, "competitions", "download", "-c", COMPETITION, "-p", str(root)]
    print("Running:", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not _zips_present(root):
        output = (result.stdout + result.stderr).strip()
        raise DataMissingError(
            f"`{' '.join(command)}` failed (exit {result.returncode}):\n{output}\n\n"
            + _instructions(root)
        )


def _instructions(root: Path) -> str:
    return (
        f"Put the Kaggle '{COMPETITION}' data under {root}, either as folders:\n"
        f"  {root}/train/                  cat.N.jpg and dog.N.jpg (25,000 labelled images)\n"
        f"  {root}/test/                   N.jpg (12,500 unlabelled images)\n"
        f"  {root}/sample_submission.csv   id,label\n"
        f"or as the zips, which `make data` extracts:\n"
        f"  {root}/{OUTER_ZIP}\n"
        f"  (or {root}/train.zip and {root}/test.zip [+ sample_submission.csv])\n"
        f"To let `make data` download them (it installs the Kaggle CLI): create an API token at\n"
        f"https://www.kaggle.com/settings (Account > API > Create New Token) and save it as\n"
        f"~/.kaggle/kaggle.json (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY; accept the\n"
        f"competition rules at https://www.kaggle.com/c/{COMPETITION}/rules; then run\n"
        f"`make data` again."
    )
