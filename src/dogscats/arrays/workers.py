"""The worker side: decode a task's files and write each row straight into the partial array.

Rows go out with `os.pwrite` into the preallocated file rather than through a memmap, so a
worker's resident memory stays one row, not every page of the array it has touched. One pwrite
per row: gathering consecutive rows into larger writes saved a little kernel time, not enough
wall time to be worth a buffer and its bookkeeping.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dogscats.arrays.decode import (
    MIN_SIDE,
    BadImageError,
    TinyImageError,
    load_image,
    quiet_opencv,
)
from dogscats.arrays.rows import row_digest

ROWS_PER_TASK = 64  # per pool task: small IPC, yet a smooth progress bar

# (row, written, reason, digest): not written, why the file is bad; written, None or a note on
# it, and the digest (rows.py) of the very bytes written (0 when not written).
RowResult = tuple[int, bool, str | None, int]
KEPT_TINY = "kept and predicted from its upscaled pixels: a submission needs every test id"


@dataclass(frozen=True)
class Task:
    """Rows for one worker: where their files are and where they go. Small, so it pickles
    cheaply."""

    array: str  # the partial .npy the rows are written into
    offset: int  # its header length: row r starts at offset + r * row_bytes
    folder: str  # the split folder holding the source files
    size: int
    rows: list[tuple[int, str]]  # (row, file name)
    keep_tiny: bool = False  # test: a tiny image is written (and noted), not left out


def make_tasks(
    array: str,
    offset: int,
    folder: str,
    size: int,
    rows: list[tuple[int, str]],
    keep_tiny: bool = False,
) -> list[Task]:
    """`rows` cut into tasks of ROWS_PER_TASK."""
    return [
        Task(array, offset, folder, size, rows[start : start + ROWS_PER_TASK], keep_tiny)
        for start in range(0, len(rows), ROWS_PER_TASK)
    ]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def decode_rows(task: Task) -> tuple[str, list[RowResult]]:
    """Decode a task's files, writing each into its row of the partial array as it comes.

    Returns the array's path with each row's result and digest. A worker stopped mid-task returns
    nothing, so the parent never counts a row done that was not written.
    """
    row_bytes = task.size * task.size * 3
    image = np.empty((task.size, task.size, 3), dtype=np.uint8)
    data = memoryview(image).cast("B")
    results: list[RowResult] = []
    fd = os.open(task.array, os.O_WRONLY)
    try:
        for row, name in task.rows:
            try:
                note = _load(os.path.join(task.folder, name), task, image)
            except BadImageError as exc:
                results.append((row, False, exc.reason, 0))
                continue
            _pwrite_all(fd, data, task.offset + row * row_bytes)
            results.append((row, True, note, row_digest(data)))  # of the very bytes written
    finally:
        os.close(fd)
    return task.array, results


def _load(path: str, task: Task, image: np.ndarray) -> str | None:
    """Decode one file into `image`; a note when it is a tiny test image (kept), while a tiny
    train image raises like any bad file (left out of training)."""
    try:
        load_image(path, task.size, out=image, min_side=MIN_SIDE)
    except TinyImageError as tiny:
        if not task.keep_tiny:
            raise
        load_image(path, task.size, out=image)  # a second decode of a few pixels: no cost
        return f"{tiny.reason}: {KEPT_TINY}"
    return None


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV threads would only contend
    # Ctrl-C and a closed terminal signal every process of the group: only the parent stops
    # (it saves its checkpoint and prints one line), then terminates the workers, which would
    # otherwise each print a traceback. That terminate's SIGTERM ends a worker at once, as by
    # default: the parent's handler (cli.main), inherited through fork, would raise in it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    quiet_opencv(mute_stderr=True)


class Decoder:
    """Runs `decode_rows` tasks on a process pool shared by both splits (inline if workers=1).

    The pool starts on first use, so an up-to-date run starts no process. fork where the
    platform has it: start-up in milliseconds and no `if __name__ == "__main__"` needed in the
    caller's script; workers only run OpenCV/numpy code, never anything of the parent's threads.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.pool is not None:
            self.pool.terminate()  # also on Ctrl-C/errors: no worker keeps writing after us
            self.pool.join()

    def run(self, tasks: list[Task]) -> Iterator[tuple[str, list[RowResult]]]:
        """Results per task, in completion order."""
        if self.workers <= 1:
            quiet_opencv()
            return map(decode_rows, tasks)
        if self.pool is None:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.pool = context.Pool(self.workers, initializer=_worker_init)
        return self.pool.imap_unordered(decode_rows, tasks)
