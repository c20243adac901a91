"""Two terminals on one data folder, and arrays changed behind the tool's back (issue 23).

Each test makes the situation itself: two processes started together behind a barrier (one of
them after a chosen offset), so that their runs really overlap; or a row of a finished arrays
file zeroed in place through a NumPy memmap. The outcome is always the one a single sequential
run gives, or a refusal in one line.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, extract_random, register_tiny_backbone, write_kaggle_dataset

from dogscats import arrays, config, store
from dogscats.arrays import rows, workers
from dogscats.finetune.inputs import Source

SIZE = 16
ARRAY_FILES = (
    "train.npy",
    "test.npy",
    "train_index.csv",
    "test_index.csv",
    "train_digests.npy",
    "test_digests.npy",
    "report.csv",
)
DECODE_DELAY_S = 0.05  # per image in the racing runs: each lasts ~0.7 s, past every offset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_kaggle_dataset(tmp_path_factory.mktemp("race") / "comp", 10, 6, size=24)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The arrays one sequential run writes."""
    out = tmp_path_factory.mktemp("sequential") / "arrays"
    arrays.preprocess(data_dir, SIZE, out_dir=out, workers=1, progress=False)
    return out


def _slow_load_image(*args, **kwargs):
    time.sleep(DECODE_DELAY_S)
    return _real_load_image(*args, **kwargs)


_real_load_image = workers.load_image


def _preprocess_after(barrier, offset: float, data_dir, out, wait: bool, log: Path) -> None:
    """A racing run (forked child): waits at the barrier, then `offset` seconds, then
    preprocesses with slowed decoding; its output goes to `log`, its exit status says how it
    ended (0 done, 3 refused)."""
    workers.load_image = _slow_load_image
    with open(log, "w") as handle:
        os.dup2(handle.fileno(), 1)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        barrier.wait()
        time.sleep(offset)
        try:
            arrays.preprocess(data_dir, SIZE, out_dir=out, workers=2, progress=False, wait=wait)
        except store.BusyError as error:
            print(f"error: {error}", flush=True)
            os._exit(3)
    os._exit(0)


def _race(target, args_of, tmp_path, name):
    """Start two forked children running `target(barrier, *args_of(k))`; return their exit
    codes and logs."""
    fork = multiprocessing.get_context("fork")
    barrier = fork.Barrier(2)
    logs = [tmp_path / f"{name}-{k}.log" for k in range(2)]
    children = [fork.Process(target=target, args=(barrier, *args_of(k), logs[k])) for k in (0, 1)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    return [child.exitcode for child in children], [log.read_text() for log in logs]


@pytest.mark.parametrize("offset", [0.0, 0.05, 0.2, 0.4])
def test_two_preprocess_runs_at_once_write_what_one_run_writes(
    data_dir, reference, tmp_path, offset
):
    out = tmp_path / "arrays"
    codes, logs = _race(
        _preprocess_after,
        lambda k: (offset * k, data_dir, out, True),
        tmp_path,
        "preprocess",
    )
    assert codes == [0, 0], logs
    for name in ARRAY_FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    # They overlapped: one of them waited, named the other, and then found the arrays made.
    waited = [log for log in logs if "Waiting for pid" in log]
    assert len(waited) == 1, logs
    assert "Arrays up to date" in waited[0] and "Arrays written" not in waited[0]
    line = next(line for line in waited[0].splitlines() if line.startswith("Waiting"))
    assert ".preprocess.lock" in line and " since " in line and "NO_WAIT=1" in line


def test_with_no_wait_the_second_run_is_refused_in_one_line(data_dir, reference, tmp_path):
    out = tmp_path / "arrays"
    codes, logs = _race(
        _preprocess_after, lambda k: (0.2 * k, data_dir, out, False), tmp_path, "refused"
    )
    assert sorted(codes) == [0, 3], logs
    refused = logs[codes.index(3)]
    assert refused.count("\n") == 1 and "is held by pid" in refused and "NO_WAIT=1" in refused
    for name in ARRAY_FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def _hold_lock(folder: Path, stage: str, held: threading.Event, release: threading.Event):
    with store.writer_lock(folder, stage):
        held.set()
        release.wait(300)


def test_make_waits_for_the_lock_holder_or_refuses_with_no_wait(tmp_path):
    """Through make: a held lock makes `make preprocess` wait, saying for whom, then finish
    once it is released; with NO_WAIT=1 it stops at once with one error line."""
    data_dir = write_kaggle_dataset(tmp_path / "comp", n_train=3, n_test=2)
    command = ["make", "-C", str(REPO), "preprocess", f"DATA_DIR={data_dir}"]
    command += ["BACKBONES=efficientnet_lite0", "FOLDS=2"]
    held, release = threading.Event(), threading.Event()
    lock_args = (config.arrays_root(data_dir), "preprocess", held, release)
    holder = threading.Thread(target=_hold_lock, args=lock_args)
    holder.start()
    try:
        held.wait()
        refused = subprocess.run(
            [*command, "NO_WAIT=1"], capture_output=True, text=True, timeout=300
        )
        assert refused.returncode == 2
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"held by pid {os.getpid()}" in errors[0], refused.stderr
        assert not (config.arrays_dir(data_dir, 224) / "manifest.json").exists()
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as waiting:
            seen = []
            for line in waiting.stdout:  # released only once it says that it waits
                seen.append(line)
                if line.startswith("Waiting for"):
                    assert f"pid {os.getpid()}" in line and ".preprocess.lock" in line
                    release.set()
            assert waiting.wait(300) == 0, "".join(seen)
        assert release.is_set() and any(line.startswith("Arrays written") for line in seen)
    finally:
        release.set()
        holder.join()
        shutil.rmtree(config.dataset_dir(data_dir), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Feature extraction: two at once into one file


def _extract(data_dir, arrays_dir, out, wait=True):
    return extract_random(data_dir, arrays_dir, out, register_tiny_backbone(SIZE), wait=wait)


def _h5(path) -> dict:
    with h5py.File(path, "r") as handle:
        return {f"{s}/{n}": handle[s][n][...] for s in ("train", "test") for n in handle[s]}


def _extract_after(barrier, offset: float, data_dir, arrays_dir, out, log: Path) -> None:
    """A racing extraction (spawned child: TensorFlow does not survive a fork)."""
    sys.path.insert(0, str(Path(__file__).parent))
    with open(log, "w") as handle:
        sys.stdout = handle
        barrier.wait()
        time.sleep(offset)
        _extract(data_dir, arrays_dir, out)


def test_two_extractions_at_once_write_what_one_writes(data_dir, reference, tmp_path):
    expected = _h5(_extract(data_dir, reference, tmp_path / "sequential.h5"))
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(2)
    out = tmp_path / "features" / "tiny.h5"
    logs = [tmp_path / f"extract-{k}.log" for k in (0, 1)]
    children = [
        spawn.Process(
            target=_extract_after, args=(barrier, 0.1 * k, data_dir, reference, out, logs[k])
        )
        for k in (0, 1)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(300)
    texts = [log.read_text() for log in logs]
    assert [child.exitcode for child in children] == [0, 0], texts
    written = _h5(out)
    assert written.keys() == expected.keys()
    for key, value in expected.items():
        assert np.array_equal(written[key], value), key
    assert sum("is up to date" in text for text in texts) == 1, texts


# ---------------------------------------------------------------------------------------------
# A row overwritten in place (case 4)


def _zero_row(array: Path, row: int) -> None:
    """What a stray tool writing into the file does: same size, same mtime order, new bytes."""
    images = np.load(array, mmap_mode="r+")
    images[row] = 0
    images.flush()
    del images


def test_a_zeroed_row_is_named_set_aside_and_rebuilt(data_dir, reference, tmp_path):
    expected = _h5(_extract(data_dir, reference, tmp_path / "clean.h5"))
    out = tmp_path / "arrays"
    arrays.preprocess(data_dir, SIZE, out_dir=out, workers=1, progress=False)
    row = 7
    name = arrays.load_split(out, "train")[1]["file"].iat[row]
    _zero_row(out / "train.npy", row)
    with pytest.raises(store.DamagedFileError) as info:
        _extract(data_dir, out, tmp_path / "features.h5")
    message = str(info.value)
    assert f"train.npy is damaged: row {row} ({name}) does not match the digest" in message
    assert "run make (or `make preprocess`) again" in message and "\n" not in message
    assert (out / "train.npy.damaged").exists() and not (out / "manifest.json").exists()
    arrays.preprocess(data_dir, SIZE, out_dir=out, workers=1, progress=False)
    assert (out / "train.npy").read_bytes() == (reference / "train.npy").read_bytes()
    rebuilt = _h5(_extract(data_dir, out, tmp_path / "features.h5"))
    for key, value in expected.items():
        assert np.array_equal(rebuilt[key], value), key


def test_fine_tuning_checks_the_rows_it_reads(reference, tmp_path):
    out = tmp_path / "arrays"
    shutil.copytree(reference, out)
    images, index = arrays.load_split(out, "train")
    checks = {split: arrays.row_check(out, split) for split in store.SPLITS}
    source = Source(images, arrays.load_split(out, "test")[0], cached=False, checks=checks)
    picked = np.array([1, 4, 5])
    assert source.views("train", picked, both=True).shape == (3, 2, SIZE, SIZE, 3)
    _zero_row(out / "train.npy", 4)
    with pytest.raises(store.DamagedFileError, match=r"train.npy is damaged: row 4 "):
        source.views("train", picked, both=True)


def test_a_resumed_split_redoes_rows_changed_on_disk(data_dir, reference, tmp_path, monkeypatch):
    """A finished split reopened because one source changed keeps only the rows whose bytes
    still match their digests."""
    data = tmp_path / "comp"
    shutil.copytree(data_dir, data)
    out = tmp_path / "arrays"
    arrays.preprocess(data, SIZE, out_dir=out, workers=1, progress=False)
    files = arrays.load_split(out, "train")[1]["file"].tolist()
    _zero_row(out / "train.npy", 3)
    touched = data / "train" / files[5]
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))
    decoded = []

    def counted(path, *args, **kwargs):
        decoded.append(Path(path).name)
        return _real_load_image(path, *args, **kwargs)

    monkeypatch.setattr(workers, "load_image", counted)
    arrays.preprocess(data, SIZE, out_dir=out, workers=1, progress=False)
    assert sorted(decoded) == sorted([files[3], files[5]])
    assert (out / "train.npy").read_bytes() == (reference / "train.npy").read_bytes()


def test_arrays_made_before_row_digests_get_them_without_decoding(
    data_dir, reference, tmp_path, monkeypatch
):
    out = tmp_path / "arrays"
    shutil.copytree(reference, out)
    for split in store.SPLITS:
        rows.digests_path(out, split).unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["row_digests"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(store.DamagedFileError, match="records no row digests.*run make"):
        arrays.row_check(out, "train")
    decoded = []
    monkeypatch.setattr(workers, "load_image", lambda *a, **k: decoded.append(a))
    arrays.preprocess(data_dir, SIZE, out_dir=out, workers=1, progress=False)
    assert decoded == []
    for name in ARRAY_FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    arrays.row_check(out, "train")(0, arrays.load_split(out, "train")[0][:])
