"""Images to uint8 arrays on disk, one set per input size.

Out dir (config.arrays_dir(DATA_DIR, size)) after `preprocess`:
  train.npy / test.npy            (N, size, size, 3) uint8 RGB
  train_index.csv / test_index.csv  id,label,file of the rows, in array order
  report.csv                      file,split,reason of every left-out train file
  train_done.json / test_done.json  a finished split's source key (a re-run skips it)
  manifest.json                   counts, size, fingerprint; written last, so its presence
                                  means the whole set is complete
While running: {split}.partial.npy (rows written in place) and {split}.partial.state.npz
(done-mask + source stamps) let an interrupted run resume without redoing finished rows.

Memory stays flat: workers decode into a buffer of a few rows and `os.pwrite` each run of
consecutive rows straight into the output file (preallocated); the parent only keeps per-row
flags. Both splits go through one stream of pool tasks; a background thread flushes written
rows to disk meanwhile, so the fsync that makes a split durable waits for the last rows only.
Every file is written under a temporary name and `os.replace`d; a re-run resumes from the
partial array using a done-mask checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from dogscats import config
from dogscats.data import (
    SPLITS,
    BadImageError,
    BadInputError,
    load_image,
    quiet_opencv,
    scan_split,
)

__all__ = ["BadInputError", "load_split", "preprocess", "read_manifest"]

FORMAT_VERSION = 1  # bump when the array contents change for the same sources
MANIFEST = "manifest.json"
REPORT = "report.csv"
ROWS_PER_TASK = 64  # per pool task: small IPC, yet a smooth progress bar
CHECKPOINT_SECONDS = 10.0  # how often the done-mask of a partial array is saved
FLUSH_SECONDS = 0.02  # how often written rows are pushed to disk while decoding goes on
WRITE_BYTES = 1 << 20  # a worker writes its consecutive rows in runs of at most this size
COPY_BLOCK_BYTES = 64 << 20  # compaction copies at most this much at a time


# ---------------------------------------------------------------------------------------------
# Paths and small helpers


def _npy(out: Path, split: str) -> Path:
    return out / f"{split}.npy"


def _index_csv(out: Path, split: str) -> Path:
    return out / f"{split}_index.csv"


def _done_json(out: Path, split: str) -> Path:
    return out / f"{split}_done.json"


def _partial(out: Path, split: str) -> Path:
    return out / f"{split}.partial.npy"


def _partial_state(out: Path, split: str) -> Path:
    return out / f"{split}.partial.state.npz"


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write via `write(handle)` to path.tmp, fsync, then rename over `path`."""
    tmp = _tmp(path)
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda h: h.write(json.dumps(data, indent=2).encode() + b"\n"))


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    _atomic_write(path, lambda h: frame.to_csv(h, index=False))


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _sha1(*parts: object) -> str:
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Source listing


@dataclass
class Listing:
    """One split's candidate files with their (size, mtime_ns) stamps, and name rejects."""

    split: str
    folder: Path
    frame: pd.DataFrame
    stamps: np.ndarray  # (N, 2) int64, row-aligned with frame
    rejects: list[tuple[str, str]] = field(default_factory=list)

    def layout_key(self, size: int) -> str:
        """Identifies the row layout of a partial array: same names, same size."""
        return _sha1(FORMAT_VERSION, size, self.split, "\n".join(self.frame["file"]))

    def source_key(self, size: int) -> str:
        """Changes whenever any listed file is added, removed, resized or touched."""
        return _sha1(
            self.layout_key(size),
            self.stamps.tobytes(),
            json.dumps(sorted(self.rejects)),
        )


def _list_split(data_dir: Path, split: str) -> Listing:
    frame, rejects = scan_split(data_dir, split)
    folder = data_dir / split
    if frame.empty:
        pattern = "cat.N.jpg / dog.N.jpg" if split == "train" else "N.jpg"
        raise BadInputError(f"{folder} holds no {pattern} images")
    where = str(folder)  # os.path.join on str: pathlib's / costs 4 us a file here
    stats = [os.stat(os.path.join(where, name)) for name in frame["file"]]
    stamps = np.array([(s.st_size, s.st_mtime_ns) for s in stats], dtype=np.int64)
    return Listing(split, folder, frame, stamps.reshape(-1, 2), rejects)


# ---------------------------------------------------------------------------------------------
# Workers: decode rows and write them into the partial array file


@dataclass(frozen=True)
class Target:
    """Where a task's rows come from and go to: small, so each pool task pickles cheaply."""

    partial: str  # the .npy file the rows are written into
    offset: int  # its header length: row r starts at offset + r * row_bytes
    folder: str  # the split folder holding the source files
    size: int


Task = tuple[Target, list[tuple[int, str]]]  # (target, [(row, file name), ...])
RowResult = tuple[int, str | None]  # (row, None if written else why the file is bad)
TaskResult = tuple[str, list[RowResult]]  # (the partial array's path, its rows' results)

_OPEN_FILES: dict[str, int] = {}  # per process: partial path -> file descriptor


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV threads would only contend
    quiet_opencv(mute_stderr=True)


def _close_files() -> None:
    while _OPEN_FILES:
        os.close(_OPEN_FILES.popitem()[1])


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


class _RowWriter:
    """Collects consecutive rows in a small buffer and writes each run with one pwrite.

    Rows go out with pwrite rather than through a memmap so the worker's resident memory stays
    a few rows, not every page of the array it has touched. Runs of up to WRITE_BYTES cost the
    kernel a third less CPU than one pwrite per row (4,000 rows of 224px: 0.06 vs 0.088 s);
    runs of 10 MB were erratic (0.06 to 0.9 s, as large page-cache allocations stall).
    """

    def __init__(self, target: Target):
        if target.partial not in _OPEN_FILES:
            _OPEN_FILES[target.partial] = os.open(target.partial, os.O_RDWR)
        self.fd, self.offset = _OPEN_FILES[target.partial], target.offset
        self.row_bytes = target.size * target.size * 3
        capacity = max(1, WRITE_BYTES // self.row_bytes)
        self.rows = np.empty((capacity, target.size, target.size, 3), dtype=np.uint8)
        self.first = self.count = 0

    def slot(self, row: int) -> np.ndarray:
        """The buffer row that row `row` of the array is decoded into; `commit` keeps it."""
        if self.count and (row != self.first + self.count or self.count == len(self.rows)):
            self.flush()
        if not self.count:
            self.first = row
        return self.rows[self.count]

    def commit(self) -> None:
        self.count += 1

    def flush(self) -> None:
        if self.count:
            data = memoryview(self.rows[: self.count]).cast("B")
            _pwrite_all(self.fd, data, self.offset + self.first * self.row_bytes)
            self.count = 0


def _decode_rows(task: Task) -> TaskResult:
    """Decode a task's files and write each into its row of the partial array file.

    A row is reported written only once its run has gone out, so a worker stopped mid-task
    leaves nothing the parent counts as done.
    """
    target, rows = task
    writer = _RowWriter(target)
    results: list[RowResult] = []
    for row, name in rows:
        try:
            load_image(os.path.join(target.folder, name), target.size, out=writer.slot(row))
        except BadImageError as exc:
            results.append((row, exc.reason))
            continue
        writer.commit()
        results.append((row, None))
    writer.flush()
    return target.partial, results


class Decoder:
    """Runs `_decode_rows` tasks on a process pool shared by both splits (inline if workers=1).

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
        _close_files()

    def run(self, tasks: list[Task]) -> Iterator[TaskResult]:
        """Results per task, in completion order."""
        if self.workers <= 1:
            quiet_opencv()
            return map(_decode_rows, tasks)
        if self.pool is None:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.pool = context.Pool(self.workers, initializer=_worker_init)
        return self.pool.imap_unordered(_decode_rows, tasks)


# ---------------------------------------------------------------------------------------------
# Both splits in one stream of tasks


@dataclass
class SplitResult:
    count: int
    bad: list[tuple[str, str]]  # (file, reason) of files that did not decode


@dataclass
class SplitJob:
    """A split being decoded: its partial array, which rows are in, and which files were bad."""

    listing: Listing
    size: int
    path: Path  # the partial array
    offset: int  # its header length: row r starts at offset + r * row_bytes
    done: np.ndarray  # per row: decoded and written
    bad: dict[int, str] = field(default_factory=dict)  # row -> why its file is unusable

    @property
    def todo(self) -> int:
        """Rows neither written nor found bad: still out with the workers."""
        return int(np.count_nonzero(~self.done)) - len(self.bad)

    def tasks(self) -> list[Task]:
        """Pool tasks for every row not done yet."""
        files = self.listing.frame["file"].tolist()  # one conversion: .iat per row costs ~8 us
        rows = [(row, files[row]) for row in np.flatnonzero(~self.done).tolist()]
        target = Target(str(self.path), self.offset, str(self.listing.folder), self.size)
        return [(target, rows[i : i + ROWS_PER_TASK]) for i in range(0, len(rows), ROWS_PER_TASK)]

    def record(self, results: list[RowResult]) -> None:
        for row, reason in results:
            if reason is None:
                self.done[row] = True
            else:
                self.bad[row] = reason

    def checkpoint(self) -> None:
        """Make the decoded rows durable, then record them as done (in that order)."""
        _fsync(self.path)
        layout = np.array(self.listing.layout_key(self.size))
        stamps = self.listing.stamps
        _atomic_write(
            _partial_state(self.path.parent, self.listing.split),
            lambda h: np.savez(h, layout=layout, done=self.done, stamps=stamps),
        )


def _open_job(out: Path, listing: Listing, size: int) -> SplitJob:
    """The split's partial array (reused when its layout matches) with its done-mask."""
    path, state_path = _partial(out, listing.split), _partial_state(out, listing.split)
    shape = (len(listing.frame), size, size, 3)
    done = _load_done_mask(path, state_path, listing, size, shape)
    if done is None:
        _remove(path, state_path)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
        _reserve_blocks(path)
        done = np.zeros(shape[0], dtype=bool)
    else:
        print(f"{listing.split}: resuming, {int(done.sum())} rows already decoded")
    offset = np.load(path, mmap_mode="r").offset  # header length: rows start here
    return SplitJob(listing, size, path, offset, done)


def _reserve_blocks(path: Path) -> None:
    """Allocate the array's disk blocks before any row is written.

    A full disk then fails at once, naming the file, not after minutes of decoding; and
    writing into allocated blocks costs the workers half the CPU of filling a sparse file
    (ext4: 0.085 vs 0.17 CPU s for 600 MB of rows). Filesystems without fallocate skip it.
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


def _load_done_mask(
    path: Path, state_path: Path, listing: Listing, size: int, shape: tuple
) -> np.ndarray | None:
    """Rows of a previous partial run that are still valid, or None to start afresh."""
    if not (path.is_file() and state_path.is_file()):
        return None
    try:
        with np.load(state_path) as state:
            layout, done, stamps = str(state["layout"]), state["done"], state["stamps"]
        if layout != listing.layout_key(size) or np.load(path, mmap_mode="r").shape != shape:
            return None
    except (OSError, ValueError, KeyError):
        return None  # a damaged checkpoint only costs a redo
    # A row whose source file changed since it was decoded is redone.
    return done & np.all(stamps == listing.stamps, axis=1)


class _Flusher:
    """Writes the workers' rows to disk in a background thread while decoding goes on.

    The fsync that makes a finished split durable then waits for the last rows only, not for
    the whole array: on the 4,000-image sample it had taken 25% of the run after decoding.
    """

    def __init__(self, paths: Iterable[Path]):
        self.paths = list(paths)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="flush-arrays", daemon=True)

    def __enter__(self) -> _Flusher:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        sync = getattr(os, "fdatasync", os.fsync)  # the size never changes: data is enough
        fds = [os.open(path, os.O_RDONLY) for path in self.paths]
        try:
            while not self.stop.wait(FLUSH_SECONDS):
                for fd in fds:
                    sync(fd)
        finally:
            for fd in fds:
                os.close(fd)


def _decode(jobs: list[SplitJob], decoder: Decoder, progress: bool) -> Iterator[SplitJob]:
    """Decode the missing rows of all jobs in one stream of pool tasks, test's first.

    Yields each job as soon as its last row is in and made durable, so that finishing one
    split overlaps decoding the next and the workers never idle between splits.
    """
    tasks = [task for job in jobs for task in job.tasks()]
    pending = [job for job in jobs if job.todo]
    yield from (job for job in jobs if not job.todo)  # every row decoded in an earlier run
    if not pending:
        return
    by_path = {str(job.path): job for job in pending}
    task_results = decoder.run(tasks)  # before tqdm: fork while no monitor thread exists
    size = pending[0].size
    names = "+".join(job.listing.split for job in pending)
    total = sum(job.todo for job in pending)
    bar = tqdm(total=total, desc=f"{names} {size}px", unit="img", disable=not progress)
    last_save = time.monotonic()
    try:
        with _Flusher(job.path for job in pending):
            for partial, results in task_results:
                job = by_path[partial]
                job.record(results)
                bar.update(len(results))
                if not job.todo:
                    pending.remove(job)
                    job.checkpoint()
                    yield job
                elif time.monotonic() - last_save > CHECKPOINT_SECONDS:
                    for job in pending:
                        job.checkpoint()
                    last_save = time.monotonic()
    finally:
        bar.close()
        for job in pending:  # also on interruption: the next run skips every row finished so far
            job.checkpoint()


def _compact(source: Path, target: Path, keep: np.ndarray, row_bytes: int) -> None:
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


def _finish_split(out: Path, job: SplitJob) -> SplitResult:
    """Check the decoded split, move its array into place (compacted when rows were bad), write
    its index and the stamp that lets a re-run skip it."""
    listing, done = job.listing, job.done
    names = listing.frame["file"]
    bad = [(names.iat[row], reason) for row, reason in sorted(job.bad.items())]
    if bad and listing.split == "test":
        raise BadInputError(
            f"{len(bad)} test image(s) in {listing.folder} cannot be used, and a submission "
            "needs every test id. Replace or re-download them, then re-run (decoded rows are "
            "kept):\n" + "\n".join(f"  {name}: {reason}" for name, reason in bad)
        )
    if not done.any():
        raise BadInputError(f"no image in {listing.folder} could be decoded")
    final = _npy(out, listing.split)
    if done.all():
        os.replace(job.path, final)  # durable already: the job's last checkpoint synced it
    else:
        compact = out / f"{listing.split}.compact.npy"
        _compact(job.path, compact, done, job.size * job.size * 3)
        os.replace(compact, final)
        _remove(job.path)
    _write_csv(_index_csv(out, listing.split), listing.frame.loc[done].reset_index(drop=True))
    _remove(_partial_state(out, listing.split))
    result = SplitResult(int(done.sum()), bad)
    key = listing.source_key(job.size)
    _write_json(_done_json(out, listing.split), {"key": key, "count": result.count, "bad": bad})
    return result


def _process_splits(
    out: Path, listings: dict[str, Listing], size: int, decoder: Decoder, progress: bool
) -> dict[str, SplitResult]:
    """Decode every split not finished with the same sources; skip the others."""
    results: dict[str, SplitResult] = {}
    jobs = []
    for split, listing in listings.items():
        finished = _read_done(out, split, listing.source_key(size))
        if finished is not None:
            print(f"{split}: already done ({finished.count} images)")
            results[split] = finished
        else:
            _remove(_done_json(out, split))
            jobs.append(_open_job(out, listing, size))
    for job in _decode(jobs, decoder, progress):
        results[job.listing.split] = _finish_split(out, job)
    return results


def _read_done(out: Path, split: str, key: str) -> SplitResult | None:
    """The stamp of a split finished with these same sources, if its outputs are in place."""
    try:
        stamp = json.loads(_done_json(out, split).read_text())
        rows = np.load(_npy(out, split), mmap_mode="r").shape[0]
    except (OSError, ValueError):
        return None
    if stamp.get("key") != key or rows != stamp["count"] or not _index_csv(out, split).is_file():
        return None
    return SplitResult(stamp["count"], [tuple(item) for item in stamp["bad"]])


# ---------------------------------------------------------------------------------------------
# Public API


def preprocess(
    data_dir: str | os.PathLike,
    size: int,
    out_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Decode and resize every train/test image of DATA_DIR to uint8 arrays; return the manifest.

    Bad train files are left out and listed in report.csv; a bad test file raises
    BadInputError naming every bad file. Returns at once when the manifest matches the sources.
    """
    data_dir = Path(os.path.abspath(os.fspath(data_dir)))
    out = Path(out_dir) if out_dir is not None else config.arrays_dir(data_dir, size)
    workers = workers or os.cpu_count() or 1
    # test first: an unusable test file stops the run before the long train pass.
    listings = {split: _list_split(data_dir, split) for split in ("test", "train")}
    sources = _sha1(*(listings[split].source_key(size) for split in SPLITS))
    current = _up_to_date(out, sources)
    if current is not None:
        print(f"Arrays up to date: {out} ({_counts_text(current)})")
        return current
    out.mkdir(parents=True, exist_ok=True)
    _remove(out / MANIFEST)  # a stale manifest must never vouch for half-replaced arrays
    with Decoder(workers) as decoder:
        results = _process_splits(out, listings, size, decoder, progress)
    report = _write_report(out, listings["train"].rejects, results["train"].bad)
    manifest = {
        "version": FORMAT_VERSION,
        "size": size,
        "data_dir": str(data_dir),
        "counts": {split: results[split].count for split in SPLITS},
        "reported": len(report),
        "sources": sources,
        "fingerprint": _fingerprint(out, sources, size),
    }
    _write_json(out / MANIFEST, manifest)
    print(f"Arrays written: {out} ({_counts_text(manifest)})")
    return manifest


def load_split(out_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, pd.DataFrame]:
    """The (N, S, S, 3) uint8 array of a split (read-only memmap) and its id,label,file index."""
    out = Path(out_dir)
    manifest = read_manifest(out)  # its presence means the arrays are complete
    images = np.load(_npy(out, split), mmap_mode="r")
    index = pd.read_csv(_index_csv(out, split), dtype={"id": str if split == "train" else "int64"})
    if not len(images) == len(index) == manifest["counts"][split]:
        raise ValueError(
            f"{out}: {split}.npy has {len(images)} rows, {split}_index.csv {len(index)}, the "
            f"manifest {manifest['counts'][split]}; delete {out} and run `make preprocess`."
        )
    return images, index


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """manifest.json of an arrays folder, with a clear error when preprocessing has not run."""
    path = Path(out_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: the image arrays are missing or incomplete. "
            "Run `make preprocess` (for this DATA_DIR and input size) first."
        ) from None


# ---------------------------------------------------------------------------------------------
# Manifest, report, fingerprint


def _up_to_date(out: Path, sources: str) -> dict | None:
    try:
        manifest = read_manifest(out)
    except (FileNotFoundError, ValueError):
        return None
    outputs = [_npy(out, s) for s in SPLITS] + [_index_csv(out, s) for s in SPLITS]
    if manifest.get("sources") != sources or not all(path.is_file() for path in outputs):
        return None
    return manifest


def _fingerprint(out: Path, sources: str, size: int) -> str:
    """What downstream feature files record: the index contents, the sources and the size."""
    indexes = [_index_csv(out, split).read_bytes() for split in SPLITS]
    return _sha1(sources, size, *indexes)


def _write_report(out: Path, rejects: list, bad: list) -> pd.DataFrame:
    rows = [(name, "train", reason) for name, reason in [*rejects, *bad]]
    report = pd.DataFrame(rows, columns=["file", "split", "reason"])
    _write_csv(out / REPORT, report)
    if rows:
        names = ", ".join(name for name, _, _ in rows)
        print(f"Left out {len(rows)} train file(s), listed in {out / REPORT}: {names}")
    return report


def _counts_text(manifest: dict) -> str:
    counts = manifest["counts"]
    return f"train {counts['train']}, test {counts['test']}, {manifest['size']}px"
