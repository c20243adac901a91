"""A split's array while it is being filled, and how an interrupted run resumes it.

{split}.partial.npy holds the rows written so far, in place; {split}.partial.state.npz (the
layout key, a done-mask, the source stamps and the rows' digests) says which rows are in. A
re-run with the same layout keeps every done row whose source file is unchanged and whose bytes
on disk still match their digest, and decodes only the others.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dogscats.arrays.rows import digests_on_disk
from dogscats.arrays.sources import Listing
from dogscats.arrays.workers import RowResult, Task, make_tasks
from dogscats.store import atomic_write, fsync_file, partial_path, remove

COPY_BLOCK_BYTES = 64 << 20  # compaction copies at most this much at a time
# The array's size never changes once allocated: syncing its data is enough where possible.
_fdatasync = getattr(os, "fdatasync", os.fsync)


def final_array(out: Path, split: str) -> Path:
    return out / f"{split}.npy"


def state_path(out: Path, split: str) -> Path:
    return out / f"{split}.partial.state.npz"


def finished_state_path(out: Path, split: str) -> Path:
    """The last checkpoint of a finished split whose rows all decoded: the source stamps of
    its rows, so that a later change of some files redoes only their rows."""
    return out / f"{split}.state.npz"


def keep_finished_state(out: Path, split: str, complete: bool) -> None:
    """After a split is finished: keep its checkpoint when the array holds every listed row
    (row r is file r), else drop it (a compacted array no longer lines up with the listing)."""
    if complete and state_path(out, split).is_file():
        os.replace(state_path(out, split), finished_state_path(out, split))
    else:
        remove(state_path(out, split), finished_state_path(out, split))


def reopen_finished(out: Path, split: str) -> bool:
    """Turn a finished split back into a partial one (its array and checkpoint under their
    partial names), so that `open_job` keeps every row whose file is unchanged. False when
    there is nothing to reopen, or a partial run is already there to resume."""
    array, state = final_array(out, split), finished_state_path(out, split)
    if not (array.is_file() and state.is_file()) or partial_path(array).exists():
        return False
    os.replace(state, state_path(out, split))
    os.replace(array, partial_path(array))
    return True


@dataclass
class SplitJob:
    """A split being decoded: its partial array, which rows are in, and which files were bad."""

    listing: Listing
    size: int
    path: Path  # the partial array
    offset: int  # its header length: row r starts at offset + r * row_bytes
    done: np.ndarray  # per row: decoded and written
    digests: np.ndarray  # per row: the digest of its bytes (rows.py), 0 until done
    bad: dict[int, str] = field(default_factory=dict)  # row -> why its file is unusable
    notes: dict[int, str] = field(default_factory=dict)  # written row -> a word on it (tiny)

    @property
    def todo(self) -> int:
        """Rows neither written nor found bad: still out with the workers."""
        return int(np.count_nonzero(~self.done)) - len(self.bad)

    def tasks(self) -> list[Task]:
        """Pool tasks for every row not done yet."""
        files = self.listing.frame["file"].tolist()  # one conversion, not a lookup per row
        rows = [(row, files[row]) for row in np.flatnonzero(~self.done).tolist()]
        keep_tiny = self.listing.split == "test"
        folder = str(self.listing.folder)
        return make_tasks(str(self.path), self.offset, folder, self.size, rows, keep_tiny)

    def record(self, results: list[RowResult]) -> None:
        for row, written, reason, digest in results:
            if not written:
                self.bad[row] = reason
                continue
            self.done[row] = True
            self.digests[row] = digest
            if reason:
                self.notes[row] = reason

    def write_back(self) -> None:
        """Push the rows written so far to disk while the workers go on decoding, so that the
        fsync making the split durable waits for the last rows only, not the whole array."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            _fdatasync(fd)
        finally:
            os.close(fd)

    def checkpoint(self) -> None:
        """Make the written rows durable, then record them as done (in that order)."""
        fsync_file(self.path)
        layout = np.array(self.listing.layout_key(self.size))
        stamps = self.listing.stamps
        noted = np.array(sorted(self.notes), dtype=np.int64)
        notes = np.array([self.notes[row] for row in noted.tolist()], dtype=str)
        arrays = {"layout": layout, "done": self.done, "stamps": stamps}
        atomic_write(
            state_path(self.path.parent, self.listing.split),
            lambda handle: np.savez(
                handle, **arrays, noted=noted, notes=notes, digests=self.digests
            ),
        )

    def move_into_place(self, final: Path) -> None:
        """Rename the finished array to `final`, copying only the done rows when some files
        were bad. Called after the last checkpoint, which made every row durable."""
        if self.done.all():
            os.replace(self.path, final)
            return
        compacted = final.with_name(f"{self.listing.split}.compact.npy")
        compact(self.path, compacted, self.done, self.size * self.size * 3)
        os.replace(compacted, final)
        remove(self.path)


def open_job(out: Path, listing: Listing, size: int) -> SplitJob:
    """The split's partial array (reused when its layout matches) with its done-mask."""
    path = partial_path(final_array(out, listing.split))
    state = state_path(out, listing.split)
    shape = (len(listing.frame), size, size, 3)
    resumed = _load_done_mask(path, state, listing, size, shape)
    if resumed is None:
        remove(path, state)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
        _reserve_blocks(path)
        done, digests, notes = np.zeros(shape[0], bool), np.zeros(shape[0], np.uint64), {}
    else:
        done, digests, notes = resumed
        print(f"{listing.split}: resuming, {int(done.sum())} rows already decoded")
    offset = np.load(path, mmap_mode="r").offset  # header length: rows start here
    return SplitJob(listing, size, path, offset, done, digests, notes=notes)


def _load_done_mask(
    path: Path, state: Path, listing: Listing, size: int, shape: tuple
) -> tuple[np.ndarray, np.ndarray, dict[int, str]] | None:
    """(done-mask, digests, notes on them (tiny test images)) of the rows of a previous
    partial run that are still valid, or None to start afresh."""
    if not (path.is_file() and state.is_file()):
        return None
    try:
        with np.load(state) as saved:
            layout, done, stamps = str(saved["layout"]), saved["done"], saved["stamps"]
            has_notes = "noted" in saved and "notes" in saved
            noted = saved["noted"].tolist() if has_notes else []
            notes = dict(zip(noted, saved["notes"].tolist() if has_notes else [], strict=True))
            recorded = saved["digests"] if "digests" in saved.files else None
        if layout != listing.layout_key(size) or np.load(path, mmap_mode="r").shape != shape:
            return None
    except (OSError, ValueError, KeyError):
        return None  # a damaged checkpoint only costs a redo
    # A row whose source file changed since it was decoded is redone...
    done = done & np.all(stamps == listing.stamps, axis=1)
    # ...and so is one whose bytes changed on disk since (a checkpoint written before row
    # digests existed adopts the rows as they are).
    found = digests_on_disk(path, done)
    if recorded is not None:
        changed = done & (found != recorded)
        if changed.any():
            print(f"{listing.split}: {int(changed.sum())} row(s) changed on disk: redoing them")
        done &= ~changed
    digests = np.where(done, found, 0).astype(np.uint64)
    return done, digests, {row: note for row, note in notes.items() if done[row]}


def _reserve_blocks(path: Path) -> None:
    """Allocate the array's disk blocks before any row is written.

    A full disk then fails at once, naming the file, not after minutes of decoding; and
    writing into allocated blocks costs the workers less CPU than filling a sparse file.
    Filesystems without fallocate skip it.
    """
    if not hasattr(os, "posix_fallocate"):  # macOS
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            size_gb = os.fstat(fd).st_size / 1e9
            raise OSError(
                errno.ENOSPC,
                f"no room for {size_gb:.1f} GB of image arrays on the disk of {path}; free "
                "some space, or preprocess fewer input sizes (SIZES=...)",
            ) from None
        # EOPNOTSUPP, EINVAL, ...: the filesystem fills holes as rows come in instead.
    finally:
        os.close(fd)


def compact(source: Path, target: Path, keep: np.ndarray, row_bytes: int) -> None:
    """Copy the kept rows of one .npy into a new .npy in bounded blocks (memory stays flat).

    Plain file reads rather than two memmaps so resident memory never maps whole arrays.
    """
    shape = (int(keep.sum()), *np.load(source, mmap_mode="r").shape[1:])
    np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=shape).flush()
    src_offset = np.load(source, mmap_mode="r").offset
    dst_offset = np.load(target, mmap_mode="r").offset
    rows_per_block = max(1, COPY_BLOCK_BYTES // row_bytes)
    with open(source, "rb") as src, open(target, "rb+") as dst:
        dst.seek(dst_offset)
        for start, stop in _runs(keep):
            for block in range(start, stop, rows_per_block):
                count = min(rows_per_block, stop - block)
                src.seek(src_offset + block * row_bytes)
                dst.write(src.read(count * row_bytes))
        dst.flush()
        os.fsync(dst.fileno())


def _runs(mask: np.ndarray) -> Iterable[tuple[int, int]]:
    """[start, stop) ranges of consecutive True values."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True)
