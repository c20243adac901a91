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

from dogscats.data import BadInputError, scan_split
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
    frame, rejects = scan_split(data_dir, split)
    folder = data_dir / split
    if frame.empty:
        pattern = "cat.N.jpg / dog.N.jpg" if split == "train" else "N.jpg"
        raise BadInputError(f"{folder} holds no {pattern} images")
    where = str(folder)  # os.path.join on str: pathlib's / costs microseconds a file here
    stats = [os.stat(os.path.join(where, name)) for name in frame["file"]]
    stamps = np.array([(s.st_size, s.st_mtime_ns) for s in stats], dtype=np.int64)
    return Listing(split, folder, frame, stamps.reshape(-1, 2), rejects)
