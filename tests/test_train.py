"""Folds, the cross-validation loop and the `train` stage's run folder."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import separable, sigmoid, write_features

from dogscats import config, features, heads, train
from dogscats.heads import _Head


def test_folds_partition_rows_and_are_stratified():
    y = np.array([0] * 70 + [1] * 30)
    folds = train.make_folds(y, n_folds=5, seed=1)
    assert sorted(np.unique(folds)) == [0, 1, 2, 3, 4]
    for fold in range(5):
        assert (folds == fold).sum() == 20
        assert y[folds == fold].sum() == 6  # 30% dogs in every fold
    assert np.array_equal(folds, train.make_folds(y, n_folds=5, seed=1))
    assert not np.array_equal(folds, train.make_folds(y, n_folds=5, seed=2))


class RecordingHead(_Head):
    """Records what each fit sees; predicts from feature 0 like the separable data's truth."""

    seen: list = []

    def __init__(self, *, validation_fraction=0.25, random_state=0):
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    def fit(self, X, y, X_val=None, y_val=None, groups=None):
        RecordingHead.seen.append((X, X_val, y_val))
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X):
        p = sigmoid(X[:, 0])
        return np.column_stack([1 - p, p])


def test_early_stopping_never_sees_the_scored_fold_nor_a_mirror_of_its_own_rows():
    X, y = separable(n=100)
    X[:, 1] = np.arange(100)  # feature 1 tags each image: its row number, +1000 for its mirror
    flip = X.copy()
    flip[:, 1] += 1000
    data = features.FeatureSet(X, X[:4], y, np.arange(100), np.arange(4), flip, X[:4])
    folds = train.make_folds(y, n_folds=4, seed=0)
    RecordingHead.seen = []
    train.cross_validate(RecordingHead(), data, folds, log=lambda *_: None)
    assert len(RecordingHead.seen) == 4
    for fold, (fit_X, stop_X, stop_y) in enumerate(RecordingHead.seen):
        fit_images, stop_images = fit_X[:, 1] % 1000, stop_X[:, 1] % 1000
        assert np.array_equal(np.sort(stop_X[:, 1]) // 1000, [0] * 19 + [1] * 19)  # + mirrors
        assert stop_y.mean() == pytest.approx(0.5, abs=0.03)
        assert not np.isin(stop_images, np.flatnonzero(folds == fold)).any()  # not scored rows
        assert not np.isin(stop_images, fit_images).any()  # nor an image it trains on
        assert len(np.unique(fit_images)) + 19 + (folds == fold).sum() == 100


def test_train_writes_a_run_folder_with_out_of_fold_predictions(tmp_path):
    X, y = separable(n=60, dim=6)
    path = tmp_path / "f.h5"
    write_features(path, [f"x.{i}" for i in range(60)], y, X, ["1", "2", "3"], X[:3], flip=True)
    out = tmp_path / "run"
    train.train([path], out, head="logreg", tta="flip", n_folds=3, log=lambda *_: None)
    oof = pd.read_csv(out / "oof.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(oof) == 60 and sorted(oof["fold"].unique()) == [0, 1, 2]
    assert metrics["log_loss"] == pytest.approx(train.scores(y, oof["pred"])["log_loss"])
    assert len(metrics["fold_scores"]) == 3 and metrics["accuracy"] > 0.9
    assert len(list(out.glob("fold_*.joblib"))) == 3


def test_train_again_is_up_to_date_until_a_setting_changes(tmp_path):
    X, y = separable(n=60, dim=6)
    path = tmp_path / "f.h5"
    write_features(path, [f"x.{i}" for i in range(60)], y, X, ["1", "2", "3"], X[:3])
    out = tmp_path / "run"
    train.train([path], out, head="logreg", n_folds=3, log=lambda *_: None)
    before = (out / "oof.csv").stat().st_mtime_ns
    log = []
    train.train([path], out, head="logreg", n_folds=3, log=log.append)
    assert log == [f"{out} is up to date: nothing to redo."]
    assert (out / "oof.csv").stat().st_mtime_ns == before  # nothing rewritten
    log.clear()
    train.train([path], out, head="logreg", n_folds=3, seed=5, log=log.append)
    assert log[0] == f"{out} is out of date (settings changed: seed): redoing it."
    assert json.loads((out / "metrics.json").read_text())["seed"] == 5
    assert pd.read_csv(out / "test.csv")["pred"].between(0, 1).all()
    assert not (tmp_path / "run.partial").exists()


def test_a_newer_method_version_redoes_the_run(tmp_path, monkeypatch):
    X, y = separable(n=60, dim=6)
    path = tmp_path / "f.h5"
    write_features(path, [f"x.{i}" for i in range(60)], y, X, ["1", "2", "3"], X[:3])
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "train.txt").write_text("2\n")
    monkeypatch.setattr(config, "VERSIONS_DIR", versions)
    out = tmp_path / "run"
    train.train([path], out, head="logreg", n_folds=3, log=lambda *_: None)
    (versions / "train.txt").write_text("3\n")
    log = []
    train.train([path], out, head="logreg", n_folds=3, log=log.append)
    assert log[0] == f"{out} is out of date (settings changed: method_version): redoing it."
    assert json.loads((out / "metrics.json").read_text())["settings"]["method_version"] == 3


def test_zeroshot_head_needs_a_shipped_classifier(tmp_path):
    X, y = separable(n=20, dim=4)
    path = tmp_path / "f.h5"
    write_features(path, [f"x.{i}" for i in range(20)], y, X, ["1"], X[:1])
    with pytest.raises(ValueError, match="zeroshot needs"):
        train.train([path], tmp_path / "run", head="zeroshot", n_folds=2, log=lambda *_: None)


def test_inner_cv_of_every_fold_keeps_an_image_and_its_mirror_together():
    X, y = separable(n=90, dim=4)
    data = features.FeatureSet(X, X[:3], y, np.arange(90), np.arange(3), X + 0.01, X[:3])
    folds = train.make_folds(y, n_folds=3, seed=0)
    head = heads.LogisticHead(Cs=(0.1, 1.0), inner_folds=3, random_state=0)
    for fold in range(3):
        model = train.fit_on_rows(head, data, folds != fold)
        n = (folds != fold).sum()  # rows 0..n-1 are the images, n..2n-1 their mirrors
        for fit, held in model.pipeline_[-1].cv:
            images, copies = np.unique(held % n, return_counts=True)
            assert np.all(copies == 2)  # each held-out image with its mirror...
            assert set(images).isdisjoint(fit % n)  # ...and neither among the rows fitted on


def test_excluded_rows_are_never_fitted_on_but_still_predicted():
    X, y = separable(n=100)
    X[:, 1] = np.arange(100)
    data = features.FeatureSet(X, X[:4], y, np.arange(100), np.arange(4))
    folds = train.make_folds(y, n_folds=4, seed=0)
    excluded = np.zeros(100, bool)
    excluded[[3, 50, 97]] = True
    RecordingHead.seen = []
    result = train.cross_validate(
        RecordingHead(validation_fraction=None), data, folds, lambda *_: None, excluded
    )
    for fold, (fit_X, _, _) in enumerate(RecordingHead.seen):
        seen = fit_X[:, 1].astype(int)
        assert np.array_equal(np.sort(seen), np.flatnonzero((folds != fold) & ~excluded))
    assert np.all(result.oof[excluded] > 0)  # predicted out of fold like any other row
