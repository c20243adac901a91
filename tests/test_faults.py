"""Fault injection: each long stage is stopped at random moments, then run again; what the
resumed run leaves equals what an uninterrupted run leaves, bit for bit.

Preprocessing is killed with SIGKILL (in a forked child: no `finally` runs, as after a power
cut); feature extraction and training are stopped by an exception at a random batch or fold,
and one extraction also has its partial file torn. The moments come from a seeded generator
(FAULT_SEED=... draws others). Fine-tuning's fault test lives in test_finetune.py, beside its
fixtures.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import (
    extract_random,
    register_tiny_backbone,
    separable,
    write_features,
    write_kaggle_dataset,
)

from dogscats import arrays, train
from dogscats.arrays import partial, stage, workers
from dogscats.forward import Forward
from dogscats.heads import LogisticHead

SIZE = 16
RNG = random.Random(int(os.environ.get("FAULT_SEED", "12")))


def moments(count: int, first: int, last: int) -> list[int]:
    """`count` distinct random points in [first, last] (all of them when fewer)."""
    points = range(first, last + 1)
    return sorted(RNG.sample(points, min(count, len(points))))


def stopped_on_call(func, stop: int):
    """`func`, raising KeyboardInterrupt (Ctrl-C) on its call number `stop` instead."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop:
            raise KeyboardInterrupt
        return func(*args, **kwargs)

    return wrapped


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_kaggle_dataset(tmp_path_factory.mktemp("faults") / "comp", 10, 6, size=24)


@pytest.fixture(scope="module")
def arrays_dir(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("arrays") / "ref"
    arrays.preprocess(data_dir, SIZE, out_dir=out, workers=1, progress=False)
    return out


ARRAY_FILES = ("train.npy", "test.npy", "train_index.csv", "test_index.csv", "report.csv")


def _preprocess_killed_after(data_dir, out, rows: int) -> None:
    """In a forked child: checkpoint after every task, SIGKILL this process once `rows` rows
    are in (the pool's workers are cut off mid-task with it)."""
    stage.CHECKPOINT_SECONDS = 0
    workers.ROWS_PER_TASK = 2
    record = partial.SplitJob.record
    seen = []

    def record_then_die(self, results):
        record(self, results)
        seen.extend(results)
        if len(seen) >= rows:
            os.kill(os.getpid(), signal.SIGKILL)

    partial.SplitJob.record = record_then_die
    arrays.preprocess(data_dir, SIZE, out_dir=out, workers=1, progress=False)


def test_preprocess_killed_at_random_moments_resumes_to_the_same_arrays(
    data_dir, arrays_dir, tmp_path
):
    total = 2 * 10 + 6
    fork = multiprocessing.get_context("fork")
    for rows in moments(3, 1, total - 1):
        out = tmp_path / f"killed_at_{rows}"
        child = fork.Process(target=_preprocess_killed_after, args=(data_dir, out, rows))
        child.start()
        child.join(60)
        assert child.exitcode == -signal.SIGKILL, f"not killed after {rows} rows"
        assert not (out / "manifest.json").exists()
        arrays.preprocess(data_dir, SIZE, out_dir=out, workers=1, progress=False)
        for name in ARRAY_FILES:
            same = (out / name).read_bytes() == (arrays_dir / name).read_bytes()
            assert same, f"{name} differs after a kill at row {rows}"
        fingerprint = arrays.read_manifest(out)["fingerprint"]
        assert fingerprint == arrays.read_manifest(arrays_dir)["fingerprint"]


def _extract(data_dir, arrays_dir, out):
    return extract_random(data_dir, arrays_dir, out, register_tiny_backbone(SIZE), tta="flip")


def _h5_contents(path) -> dict:
    with h5py.File(path, "r") as handle:
        data = {f"{s}/{n}": handle[s][n][...] for s in ("train", "test") for n in handle[s]}
        data["attrs"] = {k: str(v) for k, v in handle.attrs.items()}
    return data


def test_features_stopped_at_random_batches_resume_to_the_same_file(
    data_dir, arrays_dir, tmp_path, monkeypatch
):
    reference = _h5_contents(_extract(data_dir, arrays_dir, tmp_path / "ref.h5"))
    batches = 20 // 4 + 6 // 4 + 1  # train then test, the last batch of each padded
    real_call = Forward.__call__
    stops = moments(3, 1, batches - 1)
    for trial, stop in enumerate(stops):
        out = tmp_path / f"stopped_{trial}.h5"
        monkeypatch.setattr(Forward, "__call__", stopped_on_call(real_call, stop))
        with pytest.raises(KeyboardInterrupt):
            _extract(data_dir, arrays_dir, out)
        monkeypatch.setattr(Forward, "__call__", real_call)
        assert not out.exists()
        if trial == len(stops) - 1:  # a hard kill may tear the partial file: it is redone
            torn = out.with_name(out.name + ".partial")
            with open(torn, "r+b") as handle:
                handle.truncate(torn.stat().st_size * 2 // 3)
        resumed = _h5_contents(_extract(data_dir, arrays_dir, out))
        assert resumed.keys() == reference.keys()
        for key, value in reference.items():
            if key == "attrs":
                assert resumed[key] == value
            else:
                assert np.array_equal(resumed[key], value), f"{key} after a stop at {stop}"


def test_train_stopped_at_random_folds_resumes_to_the_same_run(tmp_path, monkeypatch):
    # The fold loop is under test, not the head: one C keeps each fit to milliseconds.
    monkeypatch.setattr(
        train,
        "make_head",
        lambda name, seed, *options: LogisticHead(Cs=(0.1,), inner_folds=2, random_state=seed),
    )
    X, y = separable(60, 6)
    feature_file = tmp_path / "f.h5"
    ids = [f"{'dog' if label else 'cat'}.{i}" for i, label in enumerate(y)]
    write_features(feature_file, ids, y, X, [str(i) for i in range(1, 11)], X[:10], flip=True)
    kwargs = {"head": "logreg", "tta": "flip", "n_folds": 3, "seed": 0, "log": len}
    reference = train.train([feature_file], tmp_path / "ref", **kwargs)
    real_fit = train.fit_on_rows
    for stop in moments(2, 1, 3):
        out = tmp_path / f"stopped_{stop}"
        monkeypatch.setattr(train, "fit_on_rows", stopped_on_call(real_fit, stop))
        with pytest.raises(KeyboardInterrupt):
            train.train([feature_file], out, **kwargs)
        monkeypatch.setattr(train, "fit_on_rows", real_fit)
        assert not out.exists() and not list(tmp_path.glob(f"{out.name}.partial*"))
        train.train([feature_file], out, **kwargs)
        for name in ("oof.csv", "test.csv"):
            assert (out / name).read_bytes() == (reference / name).read_bytes()
        metrics = json.loads((out / "metrics.json").read_text())
        expected = json.loads((reference / "metrics.json").read_text())
        assert metrics.pop("wall_s") >= 0 and expected.pop("wall_s") >= 0  # the clock differs
        assert metrics == expected
        assert pd.read_csv(out / "oof.csv")["fold"].nunique() == 3


# ---------------------------------------------------------------------------------------------
# Ctrl-C, kill and a closed terminal in `dogscats.cli preprocess` (a pool of workers)

SLOW_PREPROCESS = """
import sys, time
from dogscats.arrays import stage, workers
from dogscats.arrays.decode import load_image

def slow(*args, **kwargs):  # fork-started workers inherit this: the run lasts seconds
    time.sleep(0.05)
    return load_image(*args, **kwargs)

workers.load_image, workers.ROWS_PER_TASK, stage.CHECKPOINT_SECONDS = slow, 2, 0
from dogscats import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _stopped_preprocess(data_dir, out, signum: int, whole_group: bool):
    """`dogscats.cli preprocess` with two workers, sent `signum` once rows are checkpointed:
    to its whole process group, as a terminal sends Ctrl-C and its hangup, or to the process
    alone, as `kill` does."""
    import subprocess
    import sys
    import time

    from conftest import REPO, as_a_terminal_starts_it

    command = [sys.executable, "-c", SLOW_PREPROCESS, "preprocess", "--data-dir", str(data_dir)]
    command += ["--size", str(SIZE), "--out", str(out), "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=as_a_terminal_starts_it,
    )
    deadline = time.monotonic() + 60
    while not (out / "test.partial.state.npz").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a few tasks more: some rows in, most still to do
    (os.killpg if whole_group else os.kill)(child.pid, signum)
    stdout, stderr = child.communicate(timeout=60)
    return child.returncode, stdout, stderr


@pytest.mark.parametrize(
    ("signum", "whole_group", "word"),
    [
        (signal.SIGINT, True, "interrupted"),
        (signal.SIGTERM, False, "SIGTERM"),
        (signal.SIGHUP, True, "SIGHUP"),
    ],
    ids=["ctrl-c", "kill", "hangup"],
)
def test_a_stopped_preprocess_says_one_line_and_resumes(tmp_path, signum, whole_group, word):
    data_dir = write_kaggle_dataset(tmp_path / "comp", 20, 20, size=24)
    out = tmp_path / "arrays"
    code, _, stderr = _stopped_preprocess(data_dir, out, signum, whole_group)
    assert code == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "img/s" not in line]
    assert lines == [
        f"{word}: `preprocess` stopped; run the same command again to resume (finished work "
        "is kept, no half-written file has a final name)."
    ], stderr[-2000:]
    assert not (out / "manifest.json").exists()
    kept = sum(int(np.load(path)["done"].sum()) for path in out.glob("*.partial.state.npz"))
    assert 0 < kept < 60  # the checkpoint written on the way out holds the rows decoded so far
    counter = []
    real = workers.load_image

    def counting(*args, **kwargs):
        counter.append(args[0])
        return real(*args, **kwargs)

    workers.load_image = counting
    try:
        arrays.preprocess(data_dir, SIZE, out_dir=out, workers=1, progress=False)
    finally:
        workers.load_image = real
    assert len(counter) <= 60 - kept  # only what was not decoded before the signal
    fresh = tmp_path / "fresh"
    arrays.preprocess(data_dir, SIZE, out_dir=fresh, workers=1, progress=False)
    for name in ARRAY_FILES:
        assert (out / name).read_bytes() == (fresh / name).read_bytes()
