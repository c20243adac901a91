"""Plumbing shared by every stage: complete-or-absent writes, digests, settings stamps.

Every output of the pipeline is written under a temporary name beside its final one, synced,
then renamed: an interrupted stage leaves no half file under a final name, and the rename is
the commit. Standard library only at import time, so `make` can ask Python for names cheaply.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

SPLITS = ("train", "test")


# Suffixes that stay last in a partial name: NumPy appends `.npy` to any other name, and Keras
# refuses to save (or export to LiteRT) under any other name.
_KEPT_SUFFIXES = (".npy", ".weights.h5", ".keras", ".tflite")


def partial_path(path: str | os.PathLike) -> Path:
    """Where `path` is written until it is complete: `name.partial` in the same folder
    (a rename within one folder is atomic). For a `.npy`, `.weights.h5`, `.keras` or
    `.tflite` the suffix stays last, so NumPy and Keras accept it: `train.partial.npy`."""
    path = Path(path)
    for suffix in _KEPT_SUFFIXES:
        stem = path.name.removesuffix(suffix)
        if stem != path.name and stem:
            return path.with_name(f"{stem}.partial{suffix}")
    return path.with_name(path.name + ".partial")


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


Verify = Callable[[Path], Any]  # reads a finished partial file back; raises when it is wrong


class DamagedFileError(ValueError):
    """An output or cache fails its checks: cut short, unreadable, or not what it claims."""


def commit(partial: str | os.PathLike, path: str | os.PathLike, verify: Verify | None = None):
    """Give a finished partial file its final name: `verify(partial)` reads it back (when
    given), then it is synced and renamed. A file that fails its check is removed, never
    renamed, and the error propagates."""
    partial = Path(partial)
    try:
        if verify is not None:
            verify(partial)
        fsync_file(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    return Path(path)


def atomic_save(
    path: str | os.PathLike, save: Callable[[Path], Any], verify: Verify | None = None
) -> Path:
    """`atomic_write` for writers that take a file name, not a handle (Keras `save_weights`):
    `save(partial)` writes the partial name, `verify(partial)` (when given) reads it back, and
    only then is it synced and renamed into place."""
    path = Path(path)
    tmp = partial_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return commit(tmp, path, verify)


def set_aside(path: str | os.PathLike) -> Path:
    """Move a damaged file out of the way (`name.damaged`, replacing an older one) so that the
    stage that makes it, and make, see it missing and rebuild it; kept for a look."""
    path = Path(path)
    aside = path.with_name(path.name + ".damaged")
    if path.exists():
        os.replace(path, aside)
    return aside


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[bytes]], Any], verify: Verify | None = None
) -> Path:
    """Write `path` through `write(handle)` on its partial name, fsync, rename into place.

    On any error (a full disk included, or `verify` refusing what was written) the partial
    file is removed and the error propagates: the final name either holds the complete old
    content or the complete new one.
    """

    def save(partial: Path) -> None:
        with open(partial, "wb") as handle:
            write(handle)

    return atomic_save(path, save, verify)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def write_json(path: str | os.PathLike, data: object) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`, or None when it is missing or unreadable (a cut file)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_csv(path: str | os.PathLike, frame, verify: Verify | None = None, **to_csv: Any) -> Path:
    """A pandas DataFrame as CSV, without the index unless asked."""
    to_csv.setdefault("index", False)
    return atomic_write(path, lambda handle: frame.to_csv(handle, **to_csv), verify)


def write_joblib(path: str | os.PathLike, value: object) -> Path:
    import joblib

    return atomic_write(path, lambda handle: joblib.dump(value, handle))


def move_into_place(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename a finished file or folder over `target` (a folder replaces the old one whole)."""
    source, target = Path(source), Path(target)
    if source.is_dir() and target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh partial folder to fill; it replaces `path` whole when the block ends cleanly,
    and is removed when it raises."""
    path = Path(path)
    tmp = partial_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, path)


def remove(*paths: str | os.PathLike) -> None:
    """Delete files that may or may not exist."""
    for path in paths:
        Path(path).unlink(missing_ok=True)


def digest(*parts: object) -> str:
    """sha1 hex of the parts: bytes as they are, anything else as its str; parts separated,
    so ("ab", "c") and ("a", "bc") differ."""
    sha = hashlib.sha1()
    for part in parts:
        sha.update(part if isinstance(part, bytes) else str(part).encode())
        sha.update(b"\0")
    return sha.hexdigest()


def changed_settings(stored: dict | None, wanted: dict) -> list[str]:
    """Names of the settings that differ between a stamp and what is wanted now (all of
    them when there is no stamp)."""
    if stored is None:
        return sorted(wanted)
    return sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))


def up_to_date(
    output: str | os.PathLike,
    stored: dict | None,
    wanted: dict,
    inputs: list[Path] = (),
) -> str | None:
    """None when `output` exists, was made with the `wanted` settings and is newer than every
    input; else why it must be redone. The one up-to-date rule of the stages that record their
    settings (runs, fine-tuning); `stored` is what `output` recorded."""
    output = Path(output)
    if not output.exists():
        return "it does not exist"
    changed = changed_settings(stored, wanted)
    if changed:
        return f"settings changed: {', '.join(changed)}"
    mtime = output.stat().st_mtime
    newer = [str(path) for path in inputs if Path(path).stat().st_mtime > mtime]
    if newer:
        return f"inputs are newer: {', '.join(newer)}"
    return None


# ---------------------------------------------------------------------------------------------
# One writer per stage and folder: two terminals on one data folder take turns


class BusyError(OSError):
    """Another process holds the lock of the outputs a stage writes, and waiting was declined
    (NO_WAIT=1)."""


def lock_path(folder: str | os.PathLike, stage: str) -> Path:
    """The lock file of `stage`'s outputs in `folder` (hidden: no listing of runs sees it)."""
    return Path(folder) / f".{stage}.lock"


@contextmanager
def writer_lock(
    folder: str | os.PathLike, stage: str, wait: bool = True, log: Callable = print
) -> Iterator[Path]:
    """Hold `stage`'s lock on `folder` (the folder its outputs go to) for the block.

    A second process waits, saying in one line whose lock it waits for, or with `wait` False
    raises BusyError. fcntl.flock: the kernel drops the lock when its holder ends, however it
    ends, so a killed run never leaves a stale lock behind. The stage checks whether its
    output is up to date inside the block: the process it waited for may have just made it.
    """
    path = lock_path(folder, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            holder = _holder(fd)
            if not wait:
                raise BusyError(
                    f"{path} is held by {holder}: another run is writing these outputs. Let it "
                    "finish, or run again without NO_WAIT=1 (--no-wait) to wait for it."
                )
            log(f"Waiting for {holder}, which holds {path} (NO_WAIT=1 refuses instead).")
            sys.stdout.flush()
            fcntl.flock(fd, fcntl.LOCK_EX)
        _write_holder(fd)
        yield path
    finally:
        os.close(fd)  # releases the lock (the holder line stays: read only while it is held)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_holder(fd: int) -> None:
    """Who holds the lock: pid, command and since when, one JSON line, for those who wait."""
    argv = [os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"]
    command = " ".join(["dogscats" if argv[0] == "cli.py" else argv[0], *sys.argv[1:]])
    since = datetime.now().astimezone().isoformat(timespec="seconds")
    line = json.dumps({"pid": os.getpid(), "command": command[:200], "since": since})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (line + "\n").encode(), 0)


def _holder(fd: int, tries: int = 20) -> str:
    """'pid N (command) since T' of the lock's holder. The holder writes its line just after it
    takes the lock; a line of a holder that has ended since is an older one's: read again."""
    for _ in range(tries):
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode())
            os.kill(int(info["pid"]), 0)  # alive (a pid of another user's process counts too)
            since = datetime.fromisoformat(info["since"]).strftime("%Y-%m-%d %H:%M:%S")
            return f"pid {info['pid']} ({info['command']}) since {since}"
        except PermissionError:
            return f"pid {info['pid']} ({info['command']}) since {info['since']}"
        except (ValueError, KeyError, TypeError, ProcessLookupError, UnicodeDecodeError):
            time.sleep(0.05)
    return "another process"
