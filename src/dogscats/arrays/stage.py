"""The images -> arrays stage: `preprocess` one input size, and read its outputs back.

Out dir (config.arrays_dir(DATA_DIR, size)) after `preprocess`:
  train.npy / test.npy            (N, size, size, 3) uint8 RGB
  train_index.csv / test_index.csv  id,label,file of the rows, in array order
  report.csv                      file,split,reason of every left-out train file, and of
                                  each tiny test image (kept: every test id is predicted)
  train_done.json / test_done.json  a finished split's source key (a re-run skips it)
  train_digests.npy / test_digests.npy  each row's digest (rows.py), checked by every reader
  train.state.npz / test.state.npz  the finished rows' source stamps: when files change, only
                                  their rows are decoded again
  manifest.json                   counts, size, fingerprint; written last, so its presence
                                  means the whole set is complete
While running, partial arrays and their done-masks (see partial.py) let an interrupted run
resume without redoing finished rows.

Memory stays flat: workers write each row straight into the preallocated file and the parent
only keeps per-row flags. Both splits go through one stream of pool tasks, so finishing one
split overlaps decoding the next. Every file is written under a partial name and renamed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
from tqdm import tqdm

from dogscats import config
from dogscats.arrays.decode import MIN_SIDE
from dogscats.arrays.partial import (
    SplitJob,
    final_array,
    keep_finished_state,
    open_job,
    reopen_finished,
)
from dogscats.arrays.rows import (
    ALGORITHM,
    block_digests,
    digests_on_disk,
    digests_path,
    read_digests,
    row_digest,
    write_digests,
)
from dogscats.arrays.sources import FORMAT_VERSION, Listing, list_split
from dogscats.arrays.workers import Decoder
from dogscats.data import BadInputError
from dogscats.messages import first_line, some_names
from dogscats.store import (
    SPLITS,
    DamagedFileError,
    digest,
    read_json,
    remove,
    set_aside,
    write_csv,
    write_json,
    writer_lock,
)

MANIFEST = config.ARRAYS_MANIFEST
REPORT = "report.csv"
CHECKPOINT_SECONDS = 10.0  # how often the done-masks of partial arrays are saved


def _index_csv(out: Path, split: str) -> Path:
    return out / f"{split}_index.csv"


def _done_json(out: Path, split: str) -> Path:
    return out / f"{split}_done.json"


@dataclass
class SplitResult:
    count: int
    bad: list[tuple[str, str]]  # (file, reason) of files that did not decode
    notes: list[tuple[str, str]] = field(default_factory=list)  # (file, note): kept, noted


def _decode(jobs: list[SplitJob], decoder: Decoder, progress: bool) -> Iterator[SplitJob]:
    """Decode the missing rows of all jobs in one stream of pool tasks, test's first.

    Yields each job once its last row is in and made durable, so that finishing one split
    overlaps decoding the next and the workers never idle between splits. Jobs are yielded in
    their given order even when a later one is done first (workers race): a bad test file
    then stops the run before train's outputs are written.
    """
    tasks = [task for job in jobs for task in job.tasks()]
    pending = [job for job in jobs if job.todo]
    yield from (job for job in jobs if not job.todo)  # every row decoded in an earlier run
    if not pending:
        return
    by_path = {str(job.path): job for job in pending}
    unyielded = list(pending)
    task_results = decoder.run(tasks)  # before tqdm: fork while no monitor thread exists
    bar = _progress_bar(pending, progress)
    last_save = time.monotonic()
    try:
        for array, results in task_results:
            job = by_path[array]
            job.record(results)
            job.write_back()
            bar.update(len(results))
            if not job.todo:
                pending.remove(job)
                job.checkpoint()
                while unyielded and not unyielded[0].todo:
                    yield unyielded.pop(0)
            elif time.monotonic() - last_save > CHECKPOINT_SECONDS:
                for job in pending:
                    job.checkpoint()
                last_save = time.monotonic()
    finally:
        bar.close()
        for job in pending:  # also on interruption: the next run skips every row finished so far
            job.checkpoint()


def _progress_bar(jobs: list[SplitJob], progress: bool) -> tqdm:
    names = "+".join(job.listing.split for job in jobs)
    total = sum(job.todo for job in jobs)
    desc = f"{names} {jobs[0].size}px"
    return tqdm(total=total, desc=desc, unit="img", disable=not progress)


def _finish_split(out: Path, job: SplitJob) -> SplitResult:
    """Check the decoded split, move its array into place (compacted when rows were bad), write
    its index and the stamp that lets a re-run skip it."""
    listing, done = job.listing, job.done
    names = listing.frame["file"]
    bad = [(names.iat[row], reason) for row, reason in sorted(job.bad.items())]
    notes = [(names.iat[row], note) for row, note in sorted(job.notes.items())]
    if bad and listing.split == "test":
        report = _write_report(out, [(name, "test", reason) for name, reason in bad])
        shown = some_names(f"{name} ({reason})" for name, reason in bad)
        raise BadInputError(
            f"{len(bad):,} test image(s) in {listing.folder} cannot be used, and a submission "
            f"needs every test id: {shown}. {report} lists them all; replace or re-download "
            "them, then re-run (decoded rows are kept)"
        )
    if not done.any():
        raise BadInputError(f"no image in {listing.folder} could be decoded")
    job.move_into_place(final_array(out, listing.split))
    write_csv(_index_csv(out, listing.split), listing.frame.loc[done].reset_index(drop=True))
    write_digests(out, listing.split, job.digests[done])
    keep_finished_state(out, listing.split, complete=bool(done.all()))
    result = SplitResult(int(done.sum()), bad, notes)
    key = listing.source_key(job.size)
    stamp = {"key": key, "count": result.count, "bad": bad, "notes": notes}
    write_json(_done_json(out, listing.split), stamp)
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
            remove(_done_json(out, split))
            reopen_finished(out, split)  # only the rows of changed files are decoded again
            jobs.append(open_job(out, listing, size))
    for job in _decode(jobs, decoder, progress):
        results[job.listing.split] = _finish_split(out, job)
    return results


def _read_done(out: Path, split: str, key: str) -> SplitResult | None:
    """The stamp of a split finished with these same sources, if its outputs are in place."""
    stamp = read_json(_done_json(out, split))
    try:
        rows = np.load(final_array(out, split), mmap_mode="r").shape[0]
    except (OSError, ValueError):
        return None
    if stamp is None or stamp.get("key") != key or rows != stamp.get("count"):
        return None
    if not _index_csv(out, split).is_file():
        return None
    notes = [tuple(item) for item in stamp.get("notes", [])]
    digests = read_digests(out, split)
    if digests is None:  # arrays finished before row digests existed: adopt their rows
        digests = digests_on_disk(final_array(out, split), np.ones(rows, bool))
        write_digests(out, split, digests)
        print(f"{split}: row digests recorded ({digests_path(out, split).name})")
    if len(digests) != rows:
        return None
    return SplitResult(stamp["count"], [tuple(item) for item in stamp["bad"]], notes)


# ---------------------------------------------------------------------------------------------
# Public API


def preprocess(
    data_dir: str | os.PathLike,
    size: int,
    out_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    wait: bool = True,
) -> dict:
    """Decode and resize every train/test image of DATA_DIR to uint8 arrays; return the manifest.

    Bad train files are left out and listed in report.csv; a bad test file raises
    BadInputError naming every bad file. Returns at once when the manifest matches the sources.
    Another preprocess of the same data set is waited for (`wait` False: BusyError).
    """
    data_dir = Path(os.path.abspath(os.fspath(data_dir)))
    out = Path(out_dir) if out_dir is not None else config.arrays_dir(data_dir, size)
    # One preprocess at a time per arrays root (every size of a data set): two interleaved
    # runs would write each other's partial arrays. The up-to-date check is inside.
    with writer_lock(out.parent, "preprocess", wait):
        return _preprocess(data_dir, size, out, workers or os.cpu_count() or 1, progress)


def _preprocess(data_dir: Path, size: int, out: Path, workers: int, progress: bool) -> dict:
    # test first: an unusable test file stops the run before the long train pass.
    listings = {split: list_split(data_dir, split) for split in ("test", "train")}
    sources = digest(*(listings[split].source_key(size) for split in SPLITS))
    current = _up_to_date(out, sources)
    if current is not None:
        print(f"Arrays up to date: {out} ({_counts_text(current)})")
        return current
    out.mkdir(parents=True, exist_ok=True)
    remove(out / MANIFEST)  # a stale manifest must never vouch for half-replaced arrays
    with Decoder(workers) as decoder:
        results = _process_splits(out, listings, size, decoder, progress)
    left_out = [*listings["train"].rejects, *results["train"].bad]
    kept = results["test"].notes
    report = _write_report(
        out, [(name, "train", why) for name, why in left_out] + [(n, "test", w) for n, w in kept]
    )
    _tell_report(report, left_out, kept)
    manifest = {
        "version": FORMAT_VERSION,
        "size": size,
        "data_dir": str(data_dir),
        "counts": {split: results[split].count for split in SPLITS},
        "reported": len(left_out) + len(kept),
        "row_digests": ALGORITHM,
        "sources": sources,
        "fingerprint": _fingerprint(out, sources, size),
    }
    write_json(out / MANIFEST, manifest)
    _date_manifest(out)
    print(f"Arrays written: {out} ({_counts_text(manifest)})")
    return manifest


def load_split(out_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, pd.DataFrame]:
    """The (N, S, S, 3) uint8 array of a split (read-only memmap) and its id,label,file index.

    A cut or unreadable array or index is refused by name; the manifest is set aside with it,
    so that `make` (and `preprocess`) see the arrays as missing and rebuild them.
    """
    out = Path(out_dir)
    manifest = read_manifest(out)  # its presence means the arrays are complete
    array, index_csv = final_array(out, split), _index_csv(out, split)
    try:
        images = np.load(array, mmap_mode="r")
    except (OSError, ValueError) as error:
        _damaged(out, array, f"unreadable ({error})")
    try:
        index = pd.read_csv(index_csv, dtype={"id": str if split == "train" else "int64"})
    except (OSError, ValueError) as error:
        _damaged(out, index_csv, f"unreadable ({first_line(error)})")
    counts = (len(images), len(index), manifest["counts"][split])
    if not counts[0] == counts[1] == counts[2]:
        _damaged(
            out,
            array,
            f"{split}.npy has {counts[0]} rows, {split}_index.csv {counts[1]}, the manifest "
            f"{counts[2]}",
        )
    return images, index


def _damaged(out: Path, path: Path, why: str) -> NoReturn:
    set_aside(path)
    set_aside(out / MANIFEST)
    raise DamagedFileError(
        f"{path} is damaged: {why}. Set it aside; run make (or `make preprocess`) again to "
        "rebuild the arrays."
    )


class RowCheck:
    """`check(first, rows)`: rows first.. of a split's array, as a reader got them, against the
    digests written with them (`check.rows(indices, rows)` for rows picked out of order).

    A mismatch is named by file and row; the array and the manifest are set aside, so that
    `make` (and `preprocess`) rebuild them. The one exception: rows that match digests a
    preprocess has written since this check began mean the arrays were rebuilt while being
    read; nothing is damaged, and the reader is told to run again.
    """

    def __init__(self, out: Path, split: str, files: pd.Series | None = None):
        self.out, self.split, self.files = out, split, files
        manifest = read_manifest(out)
        self.expected = read_digests(out, split)
        if manifest.get("row_digests") != ALGORITHM:
            set_aside(out / MANIFEST)
            raise DamagedFileError(
                f"{out / MANIFEST} records no row digests (arrays made by an older version): "
                "run make (or `make preprocess`) again to add them; no image is decoded again."
            )
        if self.expected is None or len(self.expected) != manifest["counts"][split]:
            _damaged(out, digests_path(out, split), "unreadable, or not one digest per row")

    def __call__(self, first: int, rows: np.ndarray) -> None:
        self.rows(np.arange(first, first + len(rows)), rows)

    def rows(self, indices: np.ndarray, rows: np.ndarray) -> None:
        wrong = np.flatnonzero(block_digests(rows) != self.expected[indices])
        if wrong.size:
            self._mismatch(int(indices[wrong[0]]), rows[wrong[0]], int(wrong.size))

    def _mismatch(self, row: int, data: np.ndarray, count: int) -> NoReturn:
        array = final_array(self.out, self.split)
        now = read_digests(self.out, self.split)
        if now is not None and row < len(now) and now[row] != self.expected[row]:
            if now[row] == row_digest(data):
                raise DamagedFileError(
                    f"{array} was rebuilt by another preprocess while this run read it: run "
                    "the same command again."
                )
        name = f" ({self.files.iat[row]})" if self.files is not None else ""
        more = f", and {count - 1} more row(s) of the same batch" if count > 1 else ""
        _damaged(
            self.out,
            array,
            f"row {row}{name} does not match the digest written with it{more} (changed on "
            "disk after preprocessing)",
        )


def row_check(out_dir: str | os.PathLike, split: str, index: pd.DataFrame | None = None):
    """The RowCheck of a split's array (`index`, from load_split, names rows by file)."""
    files = index["file"] if index is not None and "file" in index else None
    return RowCheck(Path(out_dir), split, files)


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """manifest.json of an arrays folder, with a clear error when preprocessing has not run
    or the file is cut (then it is set aside, so that make runs preprocessing again)."""
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: the image arrays are missing or incomplete. "
            "Run `make preprocess` (for this DATA_DIR and input size) first."
        ) from None
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not {"counts", "fingerprint"} <= manifest.keys():
        set_aside(path)
        raise DamagedFileError(
            f"{path} is damaged (not a whole manifest). Set it aside; run make (or `make "
            "preprocess`) again to rebuild the arrays."
        )
    return manifest


# ---------------------------------------------------------------------------------------------
# Manifest, report, fingerprint


def _up_to_date(out: Path, sources: str) -> dict | None:
    """The manifest when the arrays stand: made from these sources, every output in place and
    each array as long as the manifest says (a cut file fails this; it costs two stats)."""
    try:
        manifest = read_manifest(out)
    except (FileNotFoundError, ValueError):
        return None
    outputs = [final_array(out, s) for s in SPLITS] + [_index_csv(out, s) for s in SPLITS]
    outputs += [digests_path(out, s) for s in SPLITS]
    if manifest.get("sources") != sources or not all(path.is_file() for path in outputs):
        return None
    if manifest.get("row_digests") != ALGORITHM:  # made before row digests: add them
        return None
    if not all(_whole(out, split, manifest) for split in SPLITS):
        return None
    return manifest


def _whole(out: Path, split: str, manifest: dict) -> bool:
    """The split's array holds every row the manifest counts, to its last byte."""
    try:
        images = np.load(final_array(out, split), mmap_mode="r")
    except (OSError, ValueError):
        return False
    expected = (manifest["counts"][split], manifest["size"], manifest["size"], 3)
    if images.shape != expected or images.dtype != np.uint8:
        return False
    digests = read_digests(out, split)
    return digests is not None and len(digests) == expected[0]


def _date_manifest(out: Path) -> None:
    """Give the manifest the time the arrays last changed (their files' newest mtime), not
    now: a manifest rewritten over unchanged arrays (after a cut one was set aside) then
    leaves the feature files, which make compares with it, up to date."""
    outputs = [final_array(out, s) for s in SPLITS] + [_index_csv(out, s) for s in SPLITS]
    newest = max(path.stat().st_mtime_ns for path in outputs)
    os.utime(out / MANIFEST, ns=(newest, newest))


def _fingerprint(out: Path, sources: str, size: int) -> str:
    """What downstream feature files record: the index contents, the sources and the size."""
    indexes = [_index_csv(out, split).read_bytes() for split in SPLITS]
    return digest(sources, size, *indexes)


def _write_report(out: Path, rows: list[tuple[str, str, str]]) -> Path:
    """report.csv: file, split, reason of every file left out or noted."""
    report = pd.DataFrame(rows, columns=["file", "split", "reason"])
    return write_csv(out / REPORT, report)


def _tell_report(report: Path, left_out: list, kept: list) -> None:
    """One line for the train files left out, one for the tiny test images kept."""
    if left_out:
        names = some_names(name for name, _ in left_out)
        print(f"Left out {len(left_out):,} train file(s), listed in {report}: {names}")
    if kept:
        names = some_names(name for name, _ in kept)
        print(
            f"Kept {len(kept):,} tiny test image(s) (under {MIN_SIDE} px a side), predicted "
            f"from their upscaled pixels, listed in {report}: {names}"
        )


def _counts_text(manifest: dict) -> str:
    counts = manifest["counts"]
    return f"train {counts['train']}, test {counts['test']}, {manifest['size']}px"
