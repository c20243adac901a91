"""Clip choice, submission checks and the scorer."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dogscats import submission as sub


def write_run(run_dir, oof_pred, labels, test_ids, test_pred):
    run_dir.mkdir(parents=True)
    pd.DataFrame(
        {
            "id": [f"x.{i}" for i in range(len(labels))],
            "label": labels,
            "fold": 0,
            "pred": oof_pred,
        }
    ).to_csv(run_dir / "oof.csv", index=False)
    pd.DataFrame({"id": test_ids, "pred": test_pred}).to_csv(run_dir / "test.csv", index=False)
    (run_dir / "metrics.json").write_text(json.dumps({"log_loss": 0.1, "accuracy": 0.9}))


def test_log_loss_matches_sklearn():
    from sklearn.metrics import log_loss

    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.1, 0.8, 0.6, 0.3, 0.99])
    assert sub.log_loss(y, p) == pytest.approx(log_loss(y, p), abs=1e-12)


def test_choose_clip_minimises_out_of_fold_loss_over_the_grid():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    p = np.where(y == 1, 0.9999, 0.0001)
    p[:10] = 1 - p[:10]  # ten confident mistakes: clipping must pay off
    c = sub.choose_clip(y, p)
    losses = {g: sub.log_loss(y, sub.clip(p, g)) for g in sub.CLIP_GRID}
    assert c > 0
    assert losses[c] == min(losses.values())


def test_choose_clip_never_leaves_predictions_unclipped():
    y = np.array([0, 1] * 50)
    p = np.where(y == 1, 0.999999, 0.000001)
    assert sub.choose_clip(y, p) == sub.CLIP_GRID.min() > 0


def test_write_submission_orders_ids_like_sample_and_clips(tmp_path):
    sample = tmp_path / "sample_submission.csv"
    pd.DataFrame({"id": [3, 1, 2], "label": 0.5}).to_csv(sample, index=False)
    run = tmp_path / "run"
    write_run(run, [0.2, 0.8], [0, 1], ["1", "2", "3"], [0.0, 1.0, 0.5])
    out = tmp_path / "subs" / "run.csv"
    result = sub.write_submission(run, sample, out, clip_value=0.005, log=lambda *_: None)
    frame = pd.read_csv(out)
    assert frame["id"].tolist() == [3, 1, 2]
    assert frame["label"].tolist() == pytest.approx([0.5, 0.005, 0.995])
    assert result["clip"] == 0.005
    assert not list(out.parent.glob("*.partial"))


def test_write_submission_refuses_a_missing_test_id(tmp_path):
    sample = tmp_path / "sample_submission.csv"
    pd.DataFrame({"id": [1, 2, 3], "label": 0.5}).to_csv(sample, index=False)
    run = tmp_path / "run"
    write_run(run, [0.2, 0.8], [0, 1], ["1", "2"], [0.1, 0.9])
    out = tmp_path / "run.csv"
    with pytest.raises(sub.SubmissionError, match="1 ids missing"):
        sub.write_submission(run, sample, out, log=lambda *_: None)
    assert not out.exists()


@pytest.mark.parametrize(
    ("ids", "labels", "message"),
    [
        (["1", "1"], [0.1, 0.2], "duplicate"),
        (["1", "2"], [0.1, np.nan], "NaN"),
        (["1", "2"], [0.1, 1.5], r"outside \[0, 1\]"),
        (["2", "1"], [0.1, 0.2], "order"),
        (["1", "2", "9"], [0.1, 0.2, 0.3], "not in sample_submission"),
    ],
)
def test_check_submission_rejects(ids, labels, message):
    with pytest.raises(sub.SubmissionError, match=message):
        sub.check_submission(pd.DataFrame({"id": ids, "label": labels}), pd.Series(["1", "2"]))


def test_score_reports_log_loss_and_accuracy(tmp_path):
    truth = tmp_path / "labels.csv"
    pd.DataFrame({"id": [1, 2], "label": [1, 0]}).to_csv(truth, index=False)
    guess = tmp_path / "sub.csv"
    pd.DataFrame({"id": [2, 1], "label": [0.2, 0.6]}).to_csv(guess, index=False)
    result = sub.score(guess, truth)
    assert result["log_loss"] == pytest.approx(-(np.log(0.6) + np.log(0.8)) / 2)
    assert result["accuracy"] == 1.0


def test_score_names_missing_ids(tmp_path):
    truth = tmp_path / "labels.csv"
    pd.DataFrame({"id": [1, 2], "label": [1, 0]}).to_csv(truth, index=False)
    guess = tmp_path / "sub.csv"
    pd.DataFrame({"id": [1], "label": [0.6]}).to_csv(guess, index=False)
    with pytest.raises(sub.SubmissionError, match="lacks 1 labelled ids"):
        sub.score(guess, truth)
