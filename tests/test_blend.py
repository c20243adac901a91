"""Blends: non-negative weights on logits, fitted on out-of-fold predictions only; nested CV."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from dogscats import blend, runs, submission, train


def write_run(path, oof: np.ndarray, test: np.ndarray, y: np.ndarray, folds: np.ndarray):
    ids = np.array([f"{'dog' if v else 'cat'}.{i}" for i, v in enumerate(y)])
    test_ids = np.arange(1, len(test) + 1).astype(str)
    predictions = runs.Predictions(ids, y, folds, oof, test_ids, test)
    return runs.write_run(path, predictions, {"log_loss": 0.0, "settings": {}})


@pytest.fixture
def three_runs(tmp_path):
    """A good run, a weaker one with its own errors, and a contrarian one; 5 folds."""
    rng = np.random.default_rng(0)
    n, n_test = 600, 50
    y = rng.integers(0, 2, n)
    folds = train.make_folds(y, 5, 0)
    truth = 2.0 * y - 1
    logits = {
        "good": 3 * truth + rng.normal(0, 1.5, n),
        "weak": 1 * truth + rng.normal(0, 1.5, n),
        "contrary": -1 * truth + rng.normal(0, 1.5, n),
    }
    test = {name: rng.uniform(0.01, 0.99, n_test) for name in logits}
    paths = [
        write_run(tmp_path / name, expit(z), test[name], y, folds) for name, z in logits.items()
    ]
    return paths, y, folds, test


def test_weights_come_from_out_of_fold_predictions_only(three_runs, tmp_path):
    paths, y, folds, test = three_runs
    blend.blend(paths, tmp_path / "b1", log=lambda *_: None)
    first = json.loads((tmp_path / "b1" / "metrics.json").read_text())
    w = first["weights"]
    assert w["good"] > w["weak"] > 0.05 and w["contrary"] == 0  # no weight below 0
    # Other test predictions (a run written anew): the same weights, and the test column
    # follows them exactly.
    contrary = runs.read_run(paths[2])
    oof, test_pred = contrary.oof["pred"].to_numpy(), 1 - contrary.test["pred"].to_numpy()
    paths[2] = write_run(tmp_path / "contrary", oof, test_pred, y, folds)
    blend.blend(paths, tmp_path / "b2", log=lambda *_: None)
    second = json.loads((tmp_path / "b2" / "metrics.json").read_text())
    assert second["weights"] == first["weights"] and second["bias"] == first["bias"]
    Z_test = blend.to_logits(np.column_stack([runs.read_run(p).test["pred"] for p in paths]))
    weights = np.array([w[p.name] for p in paths])
    expected = blend.predict(Z_test, weights, second["bias"])
    assert np.allclose(runs.read_run(tmp_path / "b2").test["pred"], expected)


def test_the_blend_scores_itself_by_nested_cv(three_runs, tmp_path):
    paths, y, folds, _ = three_runs
    blend.blend(paths, tmp_path / "b", log=lambda *_: None)
    run = runs.read_run(tmp_path / "b")
    Z = blend.to_logits(np.column_stack([runs.read_run(p).oof["pred"] for p in paths]))
    for fold in range(5):  # fold k is predicted by weights fitted without fold k
        rows = folds == fold
        w, b = blend.fit_weights(Z[~rows], y[~rows])
        assert np.allclose(run.oof["pred"][rows], blend.predict(Z[rows], w, b))
    nested = train.scores(y, run.oof["pred"].to_numpy())["log_loss"]
    assert run.metrics["log_loss"] == pytest.approx(nested)
    assert run.metrics["in_sample_log_loss"] < nested  # in-sample would flatter it
    assert nested < min(run.metrics["run_log_loss"].values())  # better than its best run
    out = tmp_path / "blend.csv"
    sample = tmp_path / "sample.csv"
    pd.DataFrame({"id": run.test["id"], "label": 0.5}).to_csv(sample, index=False)
    result = submission.write_submission(tmp_path / "b", sample, out, log=lambda *_: None)
    assert result["cv_log_loss"] <= nested + 1e-12 and len(pd.read_csv(out)) == 50


def test_blend_refuses_runs_of_other_images(three_runs, tmp_path):
    paths, y, folds, test = three_runs
    other = write_run(tmp_path / "other", np.full(10, 0.5), test["good"], y[:10], folds[:10])
    with pytest.raises(ValueError, match="holds other images than"):
        blend.blend([paths[0], other], tmp_path / "b", log=lambda *_: None)
    with pytest.raises(ValueError, match="Nothing to blend"):
        blend.blend([], tmp_path / "b", log=lambda *_: None)


def test_one_run_is_no_blend(three_runs, tmp_path):
    paths, *_ = three_runs
    with pytest.raises(ValueError, match=r"^One run is not a blend: RUNS gives only good\. "):
        blend.blend(paths[:1], tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_run_older_than_its_features_is_refused_by_name(tmp_path):
    """Case 3 of #23 in Python: a feature file rewritten after a run (another terminal's
    extraction) makes the run stale; the blend names it and writes nothing."""
    import os

    from conftest import separable, write_features

    X, y = separable(40, 4)
    ids = [f"{'dog' if label else 'cat'}.{i}" for i, label in enumerate(y)]
    feature_file = tmp_path / "f.h5"
    write_features(feature_file, ids, y, X, ["1", "2"], X[:2])
    made = [
        train.train([feature_file], tmp_path / name, n_folds=2, normalise=norm, log=len)
        for name, norm in (("a__logreg", "standard"), ("b__logreg__ssr_l2", "ssr_l2"))
    ]
    assert all(runs.stale_reason(path) is None for path in made)
    blend.blend(made, tmp_path / "blend", log=len)
    later = runs.metrics_path(made[1]).stat().st_mtime + 5
    os.utime(feature_file, (later, later))
    why = runs.stale_reason(made[0])
    assert why == f"inputs are newer: {feature_file}"
    with pytest.raises(ValueError) as refused:
        blend.blend(made, tmp_path / "blend2", log=len)
    assert str(refused.value).startswith(f"{made[0]} is out of date (inputs are newer: ")
    assert "\n" not in str(refused.value) and not (tmp_path / "blend2").exists()
    # The blend made before is out of date too, through its runs.
    assert runs.stale_reason(tmp_path / "blend").startswith(f"{made[0]} is out of date")
    # A run lacking a fold model does not stand either.
    os.utime(feature_file, (later - 10, later - 10))
    (made[1] / "fold_0.joblib").unlink()
    assert runs.stale_reason(made[1]) == "incomplete: fold_0.joblib missing or not as written"
