"""Row digests: every row of an arrays file carries a digest of its bytes.

The worker that decodes a row hashes the buffer it writes. The digests stay with the split's
checkpoint while it fills, and are saved beside the finished array as {split}_digests.npy
(uint64, one per row, in array order). Extraction and fine-tuning read every row anyway and
check each one against its digest (stage.RowCheck). A resumed split re-hashes the rows it
keeps. So a row changed after it was written is never used: overwritten in place, zeroed, or
written by a second run.

xxh3_64 (the xxhash package) rather than the standard library's crc32 or blake2b: several
times faster per row, so the check stays a negligible part of extraction (README, "What can go
wrong", has the figures; `make bench` measures it). 64 bits: no accidental damage collides.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xxhash

from dogscats.store import atomic_write

ALGORITHM = "xxh3_64"  # recorded in the manifest: readers refuse arrays made with another


def row_digest(row) -> int:
    """The digest of one row's bytes (a C-contiguous array or any bytes-like object)."""
    return xxhash.xxh3_64_intdigest(row)


def block_digests(block: np.ndarray) -> np.ndarray:
    """(n,) uint64: the digest of each row of a C-contiguous (n, ...) block."""
    return np.fromiter((row_digest(row) for row in block), np.uint64, len(block))


def digests_path(out: Path, split: str) -> Path:
    return out / f"{split}_digests.npy"


def write_digests(out: Path, split: str, digests: np.ndarray) -> Path:
    values = np.asarray(digests, np.uint64)
    return atomic_write(digests_path(out, split), lambda handle: np.save(handle, values))


def read_digests(out: Path, split: str) -> np.ndarray | None:
    """The split's digests, or None when the file is missing or unreadable."""
    try:
        values = np.load(digests_path(out, split))
    except (OSError, ValueError):
        return None
    return values if values.dtype == np.uint64 and values.ndim == 1 else None


def digests_on_disk(path: Path, rows: np.ndarray) -> np.ndarray:
    """(N,) uint64: the digest of each row of the .npy at `path` where the mask `rows` is True,
    else 0. Plain reads, not a memory map: memory stays one row (see forward._RowReader)."""
    header = np.load(path, mmap_mode="r")
    row_bytes, offset = int(np.prod(header.shape[1:])), header.offset
    del header
    found = np.zeros(len(rows), np.uint64)
    buffer = memoryview(bytearray(row_bytes))
    fd = os.open(path, os.O_RDONLY)
    try:
        for row in np.flatnonzero(rows).tolist():
            whole = os.preadv(fd, [buffer], offset + row * row_bytes) == row_bytes
            found[row] = row_digest(buffer) if whole else 0  # a cut row matches nothing
    finally:
        os.close(fd)
    return found
