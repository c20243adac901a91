"""EXCLUDE lists: train files to leave out of every head's training.

The format, shared with anything that writes such a list (lists/mislabelled-train.txt, the
report's gallery): one train file name per line (`cat.4688.jpg`), `#` starts a comment, blank
lines are skipped. Excluded rows keep their fold and are still predicted out of fold, so a run
with EXCLUDE and one without can be compared on the rows both keep.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dogscats import config, store
from dogscats.messages import some_names

SUFFIX = ".jpg"  # train ids are the file names without it (features' `ids`)


def read_list(path: str | os.PathLike) -> list[str]:
    """The file names a list holds, in order, without comments, blank lines or repeats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EXCLUDE={path}: no such file (one train file name per line)")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return list(dict.fromkeys(line for line in lines if line))  # each name once, in order


def write_list(path: str | os.PathLike, names: list[str], header: str = "") -> Path:
    """A list in the same format: `header` as `#` comment lines, then one file name a line."""
    comments = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return store.write_text(path, comments + "".join(f"{name}\n" for name in names))


def excluded_rows(train_ids: np.ndarray, path: str | os.PathLike, log=print) -> np.ndarray:
    """Boolean mask of the train rows the list names.

    A line that is no train file name (cat.N.jpg / dog.N.jpg) is refused. A well-formed name
    absent from these rows is counted and skipped in one line: the shipped list names files of
    the full train set, and a subset (the shared sample, a split) holds only some of them.
    """
    names = read_list(path)
    malformed = [name for name in names if not config.TRAIN_NAME.fullmatch(name)]
    if malformed:
        raise ValueError(
            f"EXCLUDE={path} holds {len(malformed):,} line(s) that are not train file names "
            f"(cat.N.jpg / dog.N.jpg): {some_names(malformed)}. Fix or remove those lines."
        )
    ids = [name.removesuffix(SUFFIX) for name in names]
    known = set(np.asarray(train_ids).astype(str))
    absent = [name for name, id_ in zip(names, ids, strict=True) if id_ not in known]
    if absent:
        log(
            f"EXCLUDE={path}: skipped {len(absent):,} of its {len(names):,} names, not train "
            f"images of this data set (not in DATA_DIR/train, or left out by preprocessing): "
            f"{some_names(absent)}"
        )
    return np.isin(np.asarray(train_ids).astype(str), ids)


def settings(path: str | os.PathLike | None) -> dict | None:
    """What a run's settings record of its EXCLUDE list: its content (the count and digest
    of the names), never where it lies, so two copies of one list are the same run and two
    lists of one file name are not (the run name carries the digest too)."""
    if not path:
        return None
    names = read_list(path)
    return {"count": len(names), "sha1": config.file_digest(path)}
