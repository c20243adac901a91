"""runs.py: the run folder is written whole and read back by the same module."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dogscats import config, runs


def predictions() -> runs.Predictions:
    return runs.Predictions(
        train_ids=np.array(["cat.1", "dog.1", "cat.2", "dog.2"]),
        y=np.array([0, 1, 0, 1]),
        folds=np.array([0, 0, 1, 1]),
        oof=np.array([0.1, 0.8, 0.3, 0.9]),
        test_ids=np.array([1, 2]),
        test=np.array([0.2, 0.7]),
    )


def test_a_run_reads_back_what_was_written(tmp_path):
    extra = tmp_path / "history.csv"
    extra.write_text("epoch\n0\n")
    out = runs.write_run(
        tmp_path / "run",
        predictions(),
        {"log_loss": 0.2, "settings": {"a": 1}},
        models=[{"fold": 0}, {"fold": 1}],
        extras={"history_0.csv": extra},
    )
    run = runs.read_run(out)
    assert run.oof["id"].tolist() == ["cat.1", "dog.1", "cat.2", "dog.2"]
    assert run.test["id"].tolist() == ["1", "2"] and run.n_folds == 2
    assert run.model(1) == {"fold": 1} and run.metrics["log_loss"] == 0.2
    assert (out / "history_0.csv").is_file() and not extra.exists()
    assert runs.stored_settings(out) == {"a": 1}


def test_up_to_date_needs_the_same_settings_and_older_inputs(tmp_path):
    out = runs.write_run(tmp_path / "run", predictions(), {"settings": {"a": 1}})
    log: list[str] = []
    assert runs.up_to_date(out, {"a": 1}, [], log.append)
    assert log == [f"{out} is up to date: nothing to redo."]
    assert not runs.up_to_date(out, {"a": 2}, [], log.append)
    assert log[-1] == f"{out} is out of date (settings changed: a): redoing it."


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run/metrics.json not found"):
        runs.read_run(tmp_path / "run")


def test_list_runs_names_finished_runs_only(tmp_path):
    runs.write_run(tmp_path / "b__logreg", predictions(), {})
    runs.write_run(tmp_path / "a__keras__lr0.001", predictions(), {})
    for unfinished in ("c.partial", "b__logreg.work", "d.old"):
        runs.write_run(tmp_path / unfinished, predictions(), {})  # as if left by a crash
    (tmp_path / "empty").mkdir()
    assert [p.name for p in config.list_runs(tmp_path)] == ["a__keras__lr0.001", "b__logreg"]
    assert config.list_runs(tmp_path / "none") == []


@pytest.mark.parametrize("damage", ["truncate", "empty", "nan"])
def test_a_damaged_prediction_file_is_named_and_the_run_set_aside(tmp_path, damage):
    out = runs.write_run(tmp_path / "run", predictions(), {"log_loss": 0.2, "settings": {}})
    oof = out / "oof.csv"
    text = oof.read_text()
    oof.write_text({"truncate": text[:12], "empty": "", "nan": text.replace("0.8", "nan")}[damage])
    with pytest.raises(ValueError, match=r"oof.csv is damaged: .* run make"):
        runs.read_run(out)
    assert not runs.metrics_path(out).exists()  # make sees the run missing and redoes it
    assert runs.stored_settings(out) is None


def test_a_run_lacking_a_fold_model_is_neither_up_to_date_nor_read(tmp_path):
    """Case 6 of #23: the stage redoes it, readers (submission, report) refuse it by name."""
    out = runs.write_run(tmp_path / "run", predictions(), {"settings": {"a": 1}}, models=[1, 2])
    assert runs.missing_files(out) == []
    (out / "fold_1.joblib").unlink()
    log: list[str] = []
    assert not runs.up_to_date(out, {"a": 1}, [], log.append)
    assert log == [
        f"{out} is out of date (incomplete: fold_1.joblib missing or not as written): redoing it."
    ]
    with pytest.raises(ValueError, match=r"fold_1.joblib is damaged: .* run make"):
        runs.read_run(out)
    assert not runs.metrics_path(out).exists()  # make sees the run missing and redoes it


def test_runs_written_before_the_file_list_still_check_their_fold_models(tmp_path):
    out = runs.write_run(tmp_path / "run", predictions(), {"folds": 2}, models=[1, 2])
    metrics = json.loads(runs.metrics_path(out).read_text())
    del metrics[runs.FILES]
    runs.metrics_path(out).write_text(json.dumps(metrics))
    assert runs.missing_files(out) == []
    (out / "fold_0.joblib").unlink()
    assert runs.missing_files(out) == ["fold_0.joblib"]
