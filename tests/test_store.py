"""store.py: writes are complete or absent; one digest; one up-to-date rule."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from dogscats import store


def test_atomic_write_leaves_old_content_or_new_never_half(tmp_path):
    path = tmp_path / "out.json"
    store.write_json(path, {"a": 1})
    assert store.read_json(path) == {"a": 1}

    def failing(handle):
        handle.write(b'{"a": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        store.atomic_write(path, failing)
    assert store.read_json(path) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_dir_replaces_the_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "run"
    with store.atomic_dir(out) as tmp:
        (tmp / "a.csv").write_text("1")
    with pytest.raises(RuntimeError), store.atomic_dir(out) as tmp:
        (tmp / "b.csv").write_text("2")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["a.csv"]
    with store.atomic_dir(out) as tmp:
        (tmp / "c.csv").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_digest_separates_parts_and_takes_bytes_as_they_are():
    assert store.digest("ab", "c") != store.digest("a", "bc")
    assert store.digest(b"x") == store.digest("x")
    assert store.digest(b"\xff") != store.digest(str(b"\xff"))


def test_read_json_of_a_cut_file_is_none(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"a": ')
    assert store.read_json(path) is None
    assert store.read_json(tmp_path / "missing.json") is None


def test_up_to_date_says_why_not(tmp_path):
    output, source = tmp_path / "out", tmp_path / "in"
    assert store.up_to_date(output, None, {"a": 1}) == "it does not exist"
    source.write_text("x")
    output.write_text("y")
    os.utime(source, (1, 1))
    assert store.up_to_date(output, {"a": 1}, {"a": 1}, [source]) is None
    assert store.up_to_date(output, {"a": 1}, {"a": 2, "b": 0}, [source]) == (
        "settings changed: a, b"
    )
    os.utime(source, None)
    os.utime(output, (1, 1))
    assert store.up_to_date(output, {"a": 1}, {"a": 1}, [source]).startswith("inputs are newer")


@pytest.mark.parametrize(
    "name, partial",
    [
        ("train.npy", "train.partial.npy"),
        ("w_notop.weights.h5", "w_notop.partial.weights.h5"),
        ("model.keras", "model.partial.keras"),
        ("features.h5", "features.h5.partial"),
        ("metrics.json", "metrics.json.partial"),
        (".npy", ".npy.partial"),
    ],
)
def test_partial_names_keep_the_suffix_writers_insist_on(name, partial):
    assert store.partial_path(Path("d") / name) == Path("d") / partial


def test_atomic_save_renames_a_complete_file_into_place(tmp_path):
    target = tmp_path / "sub" / "w.weights.h5"
    seen = []

    def save(partial: Path) -> None:
        seen.append(partial)
        partial.write_bytes(b"new")

    assert store.atomic_save(target, save) == target
    assert seen == [tmp_path / "sub" / "w.partial.weights.h5"]
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path):
    target = tmp_path / "w.weights.h5"
    target.write_bytes(b"old")

    def fail(partial: Path) -> None:
        partial.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.atomic_save(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


# ---------------------------------------------------------------------------------------------
# writer_lock: one writer per stage and folder


def _hold_then_die(folder, started) -> None:
    with store.writer_lock(folder, "stage"):
        started.set()
        os.kill(os.getpid(), 9)  # no `finally` runs: as after a power cut or kill -9


def test_a_held_lock_refuses_with_its_holder_named_or_is_waited_for(tmp_path):
    with store.writer_lock(tmp_path, "stage"):
        with pytest.raises(store.BusyError) as info:
            with store.writer_lock(tmp_path, "stage", wait=False):
                pass
        message = str(info.value)
        assert f"{tmp_path / '.stage.lock'} is held by pid {os.getpid()} (" in message
        assert " since 20" in message and "NO_WAIT=1" in message and "\n" not in message
        with store.writer_lock(tmp_path, "another stage", wait=False):
            pass  # other stages are not held up
    lines = []
    holder, letting_go = threading.Event(), threading.Event()

    def hold() -> None:
        with store.writer_lock(tmp_path, "stage"):
            holder.set()
            time.sleep(0.5)
            letting_go.set()  # the last thing before the release: set in every run that waits

    thread = threading.Thread(target=hold)
    thread.start()
    holder.wait()
    with store.writer_lock(tmp_path, "stage", log=lines.append):
        # Got it only once the holder let go. (Not `thread.is_alive()`: the thread may still be
        # returning after the release, which failed a CI run on a loaded machine.)
        assert letting_go.is_set()
    thread.join()
    assert len(lines) == 1 and lines[0].startswith(f"Waiting for pid {os.getpid()} (")


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    child = fork.Process(target=_hold_then_die, args=(tmp_path, started))
    child.start()
    child.join(30)
    assert started.is_set() and child.exitcode == -9
    with store.writer_lock(tmp_path, "stage", wait=False):  # free at once
        pass
