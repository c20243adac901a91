"""What a split's arrays are made from: its files, their stamps, and the keys derived from them.

The keys decide what a re-run may keep: `layout_key` the rows of a partial array, `source_key`
a finished split, and (through the manifest's `sources` and `fingerprint`) every feature file
made downstream. Their inputs must not change without a FORMAT_VERSION bump.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dogscats.data import PATTERNS, BadInputError, scan_split
from dogscats.messages import some_names
from dogscats.store import digest

FORMAT_VERSION = 1  # bump when the array contents change for the same sources


@dataclass
class Listing:
    """One split's candidate files with their (size, mtime_ns) stamps, and name rejects."""

    split: str
    folder: Path
    frame: pd.DataFrame  # id, label, file: one row per array row
    stamps: np.ndarray  # (N, 2) int64, row-aligned with frame
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def layout_key(self, size: int) -> str:
        """Identifies the row layout of a partial array: same names, same size."""
        return digest(FORMAT_VERSION, size, self.split, "\n".join(self.frame["file"]))

    def source_key(self, size: int) -> str:
        """Changes whenever any listed file is added, removed, resized or touched."""
        return digest(
            self.layout_key(size),
            self.stamps.tobytes(),
            json.dumps(sorted(self.rejects)),
        )


def list_split(data_dir: Path, split: str) -> Listing:
    """A split's files with their stamps. A train file that cannot even be stat'ed (a dangling
    symlink, no permission) is rejected by name like a misnamed one; a test file so is refused,
    since a submission needs every test id."""
    frame, rejects = scan_split(data_dir, split)
    folder = data_dir / split
    if frame.empty:
        raise BadInputError(f"{folder} holds no {PATTERNS[split]} images")
    where = str(folder)  # os.path.join on str: pathlib's / costs microseconds a file here
    stats, unreadable = [], []
    for name in frame["file"]:
        try:
            stats.append(os.stat(os.path.join(where, name)))
        except OSError as error:
            stats.append(None)
            unreadable.append((name, _stat_problem(os.path.join(where, name), error)))
    if unreadable and split == "test":
        problems = [f"{name} ({reason})" for name, reason in unreadable]
        raise BadInputError(
            f"{len(unreadable):,} test file(s) in {folder} cannot be read, and a submission "
            f"needs every test id: {some_names(problems)}. Replace them, then re-run"
        )
    if unreadable:
        keep = np.array([stat is not None for stat in stats])
        frame = frame.loc[keep].reset_index(drop=True)
        stats = [stat for stat in stats if stat is not None]
        rejects = sorted([*rejects, *unreadable])
        if frame.empty:
            names = some_names(name for name, _ in unreadable)
            raise BadInputError(f"no file in {folder} can be read: {names}")
    stamps = np.array([(s.st_size, s.st_mtime_ns) for s in stats], dtype=np.int64)
    return Listing(split, folder, frame, stamps.reshape(-1, 2), rejects)


def _stat_problem(path: str, error: OSError) -> str:
    if os.path.islink(path) and not os.path.exists(path):
        return f"dangling symlink: its target {os.readlink(path)} does not exist"
    return f"cannot read file: {error.strerror or error}"
