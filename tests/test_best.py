"""`make best`: the frozen run, each of FT_BACKBONES fine-tuned and their blend, on a tiny data
set the test makes; stopped in the middle of fine-tuning and run again, it writes the submission
an uninterrupted `make best` writes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pandas as pd
import pytest
from conftest import REPO, as_a_terminal_starts_it, write_kaggle_dataset
from test_makefile import error_lines, make, make_fails, make_var

from dogscats import backbones, blend, config, plan, runs

SETTINGS = [
    "BACKBONES=efficientnet_lite0",
    "FT_BACKBONES=efficientnet_lite0",
    "BEST_FROZEN=efficientnet_lite0_288",
    "WEIGHTS=random",
    "FOLDS=2",
    "FT_EPOCHS=1",
]


def best_var(name: str, data_dir) -> str:
    return make_var(name, f"DATA_DIR={data_dir}", *SETTINGS, "MAKECMDGOALS=best")


@pytest.fixture
def twin_datasets(tmp_path):
    """The same images under two DATA_DIRs (two dataset keys, so two sets of outputs)."""
    first = write_kaggle_dataset(tmp_path / "one" / "comp", n_train=10, n_test=4, seed=11)
    second = tmp_path / "two" / "comp"
    shutil.copytree(first, second)
    yield first, second
    for data_dir in (first, second):
        shutil.rmtree(config.dataset_dir(data_dir), ignore_errors=True)
        shutil.rmtree(config.submissions_dir(data_dir), ignore_errors=True)


def stop_when(command: list[str], ready, timeout: float = 300) -> int:
    """Run `command` in its own process group and Ctrl-C the group once `ready()` holds."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=as_a_terminal_starts_it,
    )
    deadline = time.monotonic() + timeout
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.1)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
    return process.wait(timeout=120)


def test_make_best_blends_the_frozen_run_with_the_fine_tuned_ones_and_resumes(twin_datasets):
    whole, stopped = twin_datasets
    done = make("best", f"DATA_DIR={whole}", *SETTINGS).stdout
    frozen_run, large_run, ft_run = best_var("BEST_RUNS", whole).split()
    models = config.models_dir(whole)
    blend_dir = REPO / best_var("BEST_BLEND_DIR", whole)
    submission = REPO / best_var("BEST_SUBMISSION", whole)
    weights = runs.read_run(blend_dir).metrics["weights"]
    assert list(weights) == [frozen_run, large_run, ft_run]
    assert "__finetune1__augflip__ep1" in ft_run
    assert large_run.startswith("efficientnet_lite0_288__logreg")
    large_features = runs.read_run(models / large_run).metrics["feature_files"]
    assert large_features[0].endswith("/efficientnet_lite0_288.random.h5")
    assert runs.read_run(models / ft_run).metrics["head"] == "finetune"
    assert f"Submission: {submission.relative_to(REPO)}\n  out-of-fold log loss " in done
    assert f"x {ft_run} (its out-of-fold log loss " in done
    frame = pd.read_csv(submission)
    assert len(frame) == 4 and frame["label"].between(0, 1).all()

    again = make("best", f"DATA_DIR={whole}", *SETTINGS).stdout
    assert "train --features" not in again and "finetune --data-dir" not in again
    assert "Submission: " in again

    # Stopped once fold 0 of the fine-tuning is done, then run again: the same bytes.
    work = config.models_dir(stopped) / (ft_run + ".work")
    command = ["make", "-C", str(REPO), "best", f"DATA_DIR={stopped}", *SETTINGS]
    assert stop_when(command, lambda: (work / "fold_0.joblib").is_file()) != 0
    assert work.is_dir() and not (config.models_dir(stopped) / ft_run).exists()
    resumed = make("best", f"DATA_DIR={stopped}", *SETTINGS).stdout
    assert "Resuming the unfinished fine-tuning" in resumed
    assert "train --features" not in resumed  # the frozen run was finished: not redone
    resumed_csv = REPO / best_var("BEST_SUBMISSION", stopped)
    assert resumed_csv.name == submission.name  # same run names; another dataset's folder
    assert resumed_csv.read_bytes() == submission.read_bytes()

    # An image replaced behind make's back: the fine-tuned run no longer stands, and a blend
    # of the runs as they are is refused by name rather than written.
    (whole / "test" / "1.jpg").write_bytes((whole / "test" / "2.jpg").read_bytes())
    plan.refresh_sources_stamp(whole, config.sources_stamp(whole))
    assert "an image was added, removed or replaced" in runs.stale_reason(models / ft_run)
    with pytest.raises(ValueError, match="is out of date"):
        blend.check_runs([models / frozen_run, models / ft_run])


def test_make_best_refuses_a_fine_tuned_head_and_an_empty_list(tmp_path):
    data_dir = write_kaggle_dataset(tmp_path / "comp", n_train=5, n_test=2)
    (line,) = error_lines(make_fails("best", f"DATA_DIR={data_dir}", "HEAD=finetune"))
    assert line.startswith("error: make best fits the frozen head of BACKBONES itself")
    (line,) = error_lines(make_fails("best", f"DATA_DIR={data_dir}", "FT_BACKBONES="))
    assert line == "error: FT_BACKBONES is empty: name the backbones make best fine-tunes."
    assert not config.dataset_dir(data_dir).exists()


@pytest.mark.parametrize(
    ("best_frozen", "second"),
    [
        ("", []),  # none
        ("efficientnet_lite0", []),  # the frozen run of BACKBONES itself: blended once
        ("offline_large", ["+".join(backbones.offline_backbones("offline_large"))]),
    ],
)
def test_best_frozen_adds_a_second_frozen_run_once(tmp_path, best_frozen, second):
    lines = plan.plan(
        plan.Variables(
            data_dir=str(tmp_path / "comp"),
            backbones="efficientnet_lite0",
            ft_backbones="efficientnet_lite0",
            best_frozen=best_frozen,
            best=True,
        )
    )
    values = dict(line.split(" := ", 1) for line in lines if " := " in line)
    first, *rest = values["BEST_RUNS"].split()
    assert first == "efficientnet_lite0__logreg__ssr_l2"
    assert [run.split("__")[0] for run in rest] == [*second, "efficientnet_lite0"]
    assert values["BEST_FROZEN_BACKBONES"] == " ".join(second).replace("+", " ")
