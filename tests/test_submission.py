"""Clip choice, submission checks and the scorer."""

from __future__ import annotations

import json
import os

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
        (["1", "2", "9"], [0.1, 0.2, 0.3], "ids not in the expected ids"),
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
    with pytest.raises(
        sub.SubmissionError, match=r"sub.csv rejected: 1 ids missing, e.g. \['2'\]"
    ):
        sub.score(guess, truth)


def test_a_missing_submission_names_the_ones_beside_it_newest_first(tmp_path):
    truth = tmp_path / "labels.csv"
    pd.DataFrame({"id": [1, 2], "label": [1, 0]}).to_csv(truth, index=False)
    folder = tmp_path / "submissions"
    folder.mkdir()
    for age, name in enumerate(["newest.csv", "older.csv"]):
        (folder / name).write_text("id,label\n")
        os.utime(folder / name, (1e9 - age, 1e9 - age))
    with pytest.raises(FileNotFoundError) as caught:
        sub.score(folder / "wanted.csv", truth)
    assert str(caught.value) == (
        f"{folder / 'wanted.csv'} not found: give the submission CSV to score (SUBMISSION=...); "
        f"{folder} holds, newest first: newest.csv, older.csv"
    )


def test_score_refuses_labels_that_are_not_0_or_1(tmp_path):
    """A submission given as LABELS (sample_submission.csv: every label 0.5) is refused, not
    scored as if it were the truth."""
    truth = tmp_path / "sample_submission.csv"
    pd.DataFrame({"id": [1, 2], "label": [0.5, 0.5]}).to_csv(truth, index=False)
    guess = tmp_path / "sub.csv"
    pd.DataFrame({"id": [1, 2], "label": [0.2, 0.6]}).to_csv(guess, index=False)
    with pytest.raises(sub.SubmissionError) as caught:
        sub.score(guess, truth)
    assert str(caught.value) == (
        f"Labels {truth} rejected: true labels are 0 (cat) or 1 (dog); 2 label(s) are not, "
        "e.g. [0.5, 0.5]. Give the labels file (LABELS=...), not a submission."
    )


# Every file the competition's scorer would refuse, as text: `make score` refuses it too.
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,lable\n1,0.6\n2,0.2\n", "header must be `id,label`. Received: 'id,lable'"),
        ("id,label\n1,0.6\n", "1 ids missing"),
        ("id,label\n1,0.6\n2,0.2\n2,0.3\n", r"duplicate ids: \['2'\]"),
        ("id,label\n1,0.6\n2,0.2\n3,0.3\n", "1 ids not in the expected ids"),
        ("id,label\n1,0.6\n2,dog\n", r"labels that are not numbers: \['dog'\]"),
        ("id,label\n1,0.6\n2,\n", "1 NaN or empty labels"),
        ("id,label\n1,0.6\n2,nan\n", "1 NaN or empty labels"),
        ("id,label\n1,1.2\n2,-0.1\n", r"2 labels outside \[0, 1\]"),
        ("id,label\n1,0.6\nx,0.2\n", "ids that are not whole numbers"),
        ("", "not a readable CSV"),
    ],
)
def test_score_refuses_what_the_competition_would_refuse(tmp_path, text, message):
    truth = tmp_path / "labels.csv"
    pd.DataFrame({"id": [1, 2], "label": [1, 0]}).to_csv(truth, index=False)
    guess = tmp_path / "sub.csv"
    guess.write_text(text)
    with pytest.raises(sub.SubmissionError, match=message) as caught:
        sub.score(guess, truth)
    assert str(guess) in str(caught.value)


@pytest.mark.parametrize("clip", [0.7, 0.5, 0, -1, float("nan")])
def test_a_clip_outside_0_to_half_is_refused_before_writing(tmp_path, clip):
    sample = tmp_path / "sample_submission.csv"
    pd.DataFrame({"id": [1, 2], "label": 0.5}).to_csv(sample, index=False)
    run = tmp_path / "run"
    write_run(run, [0.2, 0.8], [0, 1], ["1", "2"], [0.1, 0.9])
    out = tmp_path / "run.csv"
    with pytest.raises(ValueError, match=r"CLIP must be 'auto' or a number in \(0, 0.5\)"):
        sub.write_submission(run, sample, out, clip_value=clip, log=lambda *_: None)
    assert not out.exists()


def test_a_header_typo_in_the_sample_names_the_file_and_the_fix(tmp_path):
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("Id,label\n1,0.5\n2,0.5\n")
    run = tmp_path / "run"
    write_run(run, [0.2, 0.8], [0, 1], ["1", "2"], [0.1, 0.9])
    with pytest.raises(sub.SubmissionError, match="header has no `id` column") as caught:
        sub.write_submission(run, sample, tmp_path / "run.csv", log=lambda *_: None)
    assert str(sample) in str(caught.value) and "\n" not in str(caught.value)


def test_without_a_sample_the_ids_come_from_the_test_folder(tmp_path):
    (tmp_path / "test").mkdir()
    for i in (10, 2, 1):
        (tmp_path / "test" / f"{i}.jpg").write_bytes(b"")
    run = tmp_path / "run"
    write_run(run, [0.2, 0.8], [0, 1], ["10", "1", "2"], [0.3, 0.1, 0.2])
    out = tmp_path / "run.csv"
    sub.write_submission(run, tmp_path / "sample_submission.csv", out, 0.01, log=lambda *_: None)
    assert pd.read_csv(out)["id"].tolist() == [1, 2, 10]


def test_a_written_submission_that_reads_back_wrong_gets_no_final_name(tmp_path, monkeypatch):
    sample = tmp_path / "sample_submission.csv"
    pd.DataFrame({"id": [1, 2], "label": 0.5}).to_csv(sample, index=False)
    run = tmp_path / "run"
    write_run(run, [0.2, 0.8], [0, 1], ["1", "2"], [0.1, 0.9])
    out = tmp_path / "run.csv"
    monkeypatch.setattr(
        sub, "read_submission", lambda path: pd.DataFrame({"id": ["1"], "label": [0.5]})
    )
    with pytest.raises(sub.SubmissionError, match="1 ids missing"):
        sub.write_submission(run, sample, out, 0.01, log=lambda *_: None)
    assert list(tmp_path.glob("run.csv*")) == []
