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

Memory stays flat: workers decode and `os.pwrite` each row straight into the output file, and
the parent only keeps per-row flags. Every file is written under a temporary name and
`os.replace`d; a re-run resumes from the partial array using a done-mask checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
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
    stats = [os.stat(folder / name) for name in frame["file"]]
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


def _decode_rows(task: Task) -> list[RowResult]:
    """Decode a task's files and write each into its row of the partial array file.

    Rows go out with pwrite rather than through a memmap so the worker's resident memory
    stays one image, not every page of the array it has touched.
    """
    target, rows = task
    if target.partial not in _OPEN_FILES:
        _OPEN_FILES[target.partial] = os.open(target.partial, os.O_RDWR)
    fd, row_bytes = _OPEN_FILES[target.partial], target.size * target.size * 3
    results: list[RowResult] = []
    for row, name in rows:
        try:
            image = load_image(os.path.join(target.folder, name), target.size)
        except BadImageError as exc:
            results.append((row, exc.reason))
            continue
        _pwrite_all(fd, memoryview(image).cast("B"), target.offset + row * row_bytes)
        results.append((row, None))
    return results


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

    def run(self, tasks: list[Task]) -> Iterator[list[RowResult]]:
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
# One split


@dataclass
class SplitResult:
    count: int
    bad: list[tuple[str, str]]  # (file, reason) of files that did not decode


def _open_partial(out: Path, listing: Listing, size: int) -> tuple[Path, int, np.ndarray]:
    """The partial array (reused when its layout matches) with its offset and done-mask."""
    path, state_path = _partial(out, listing.split), _partial_state(out, listing.split)
    shape = (len(listing.frame), size, size, 3)
    done = _load_done_mask(path, state_path, listing, size, shape)
    if done is None:
        _remove(path, state_path)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
        done = np.zeros(shape[0], dtype=bool)
    offset = np.load(path, mmap_mode="r").offset  # header length: rows start here
    return path, offset, done


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


def _checkpoint(path: Path, state_path: Path, listing: Listing, size: int, done: np.ndarray):
    """Make the decoded rows durable, then record them as done (in that order)."""
    _fsync(path)
    _atomic_write(
        state_path,
        lambda h: np.savez(
            h, layout=np.array(listing.layout_key(size)), done=done, stamps=listing.stamps
        ),
    )


def _decode_split(
    out: Path, listing: Listing, size: int, decoder: Decoder, progress: bool
) -> tuple[Path, np.ndarray, dict[int, str]]:
    """Fill the partial array; return its path, the done-mask and {row: reason} of bad rows."""
    path, offset, done = _open_partial(out, listing, size)
    files = listing.frame["file"].tolist()  # one conversion: .iat per row cost ~8 us each
    todo = [(row, files[row]) for row in np.flatnonzero(~done).tolist()]
    if len(todo) < len(done):
        print(f"{listing.split}: resuming, {len(done) - len(todo)} rows already decoded")
    target = Target(str(path), offset, str(listing.folder), size)
    tasks = [(target, todo[i : i + ROWS_PER_TASK]) for i in range(0, len(todo), ROWS_PER_TASK)]
    bad: dict[int, str] = {}
    state_path = _partial_state(out, listing.split)
    task_results = decoder.run(tasks)  # before tqdm: fork while no monitor thread exists
    bar = tqdm(total=len(todo), desc=f"{listing.split} {size}px", unit="img", disable=not progress)
    last_save = time.monotonic()
    try:
        for results in task_results:
            _record(results, done, bad)
            bar.update(len(results))
            if time.monotonic() - last_save > CHECKPOINT_SECONDS:
                _checkpoint(path, state_path, listing, size, done)
                last_save = time.monotonic()
    finally:
        bar.close()
        # Also on interruption: the next run skips every row finished so far.
        _checkpoint(path, state_path, listing, size, done)
    return path, done, bad


def _record(results: list[RowResult], done: np.ndarray, bad: dict[int, str]):
    for row, reason in results:
        if reason is None:
            done[row] = True
        else:
            bad[row] = reason


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


def _finish_split(out: Path, listing: Listing, size: int, partial: Path, done: np.ndarray):
    """Move the array into place (compacted when rows were bad), then write its index."""
    final = _npy(out, listing.split)
    if done.all():
        _fsync(partial)
        os.replace(partial, final)
    else:
        compact = out / f"{listing.split}.compact.npy"
        _compact(partial, compact, done, size * size * 3)
        os.replace(compact, final)
        _remove(partial)
    _write_csv(_index_csv(out, listing.split), listing.frame.loc[done].reset_index(drop=True))


def _process_split(
    out: Path, listing: Listing, size: int, decoder: Decoder, progress: bool
) -> SplitResult:
    key = listing.source_key(size)
    finished = _read_done(out, listing.split, key)
    if finished is not None:
        print(f"{listing.split}: already done ({finished.count} images)")
        return finished
    _remove(_done_json(out, listing.split))
    partial, done, bad_rows = _decode_split(out, listing, size, decoder, progress)
    bad = [(listing.frame["file"].iat[row], reason) for row, reason in sorted(bad_rows.items())]
    if bad and listing.split == "test":
        raise BadInputError(
            f"{len(bad)} test image(s) in {listing.folder} cannot be used, and a submission "
            "needs every test id. Replace or re-download them, then re-run (decoded rows are "
            "kept):\n" + "\n".join(f"  {name}: {reason}" for name, reason in bad)
        )
    if not done.any():
        raise BadInputError(f"no image in {listing.folder} could be decoded")
    _finish_split(out, listing, size, partial, done)
    _remove(_partial_state(out, listing.split))
    result = SplitResult(int(done.sum()), bad)
    _write_json(
        _done_json(out, listing.split), {"key": key, "count": result.count, "bad": result.bad}
    )
    return result


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
        results = {
            split: _process_split(out, listing, size, decoder, progress)
            for split, listing in listings.items()
        }
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
