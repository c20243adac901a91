"""From a run folder's fold-averaged test predictions to a checked, clipped submission CSV.

Clipping bounds the cost of one confident mistake: log loss of a wrong p=1 is infinite, of a
wrong 1-c is -log(c). c is chosen where the out-of-fold log loss is lowest, unless given.
Imports no TensorFlow, so a warm `make submission` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from dogscats import runs, store

# Never 0: a clip of 1e-4 costs at most 9.2 / n_test per confident mistake on the leaderboard.
CLIP_GRID = np.round(np.geomspace(1e-4, 0.05, 40), 6)


def clip(p: np.ndarray, c: float) -> np.ndarray:
    return np.clip(p, c, 1 - c)


def image_log_loss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Each image's binary log loss (p clipped to 1e-15 as Kaggle does)."""
    p = np.clip(np.asarray(p, float), 1e-15, 1 - 1e-15)
    y = np.asarray(y, float)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary log loss, the competition metric."""
    return float(np.mean(image_log_loss(y, p)))


def choose_clip(y: np.ndarray, oof: np.ndarray, grid: np.ndarray = CLIP_GRID) -> float:
    """The c in `grid` minimising the out-of-fold log loss of clip(oof, c)."""
    losses = [log_loss(y, clip(oof, c)) for c in grid]
    return float(grid[int(np.argmin(losses))])


class SubmissionError(ValueError):
    pass


def check_submission(frame: pd.DataFrame, expected_ids: pd.Series) -> None:
    """Every expected id exactly once, in order, no NaN, all labels in [0, 1]."""
    problems = []
    if frame["id"].duplicated().any():
        problems.append(f"duplicate ids: {frame['id'][frame['id'].duplicated()].tolist()[:10]}")
    missing = set(expected_ids) - set(frame["id"])
    if missing:
        problems.append(f"{len(missing)} ids missing, e.g. {sorted(missing)[:10]}")
    extra = set(frame["id"]) - set(expected_ids)
    if extra:
        problems.append(
            f"{len(extra)} ids not in sample_submission.csv, e.g. {sorted(extra)[:10]}"
        )
    if frame["label"].isna().any():
        problems.append(f"{int(frame['label'].isna().sum())} NaN labels")
    elif not frame["label"].between(0, 1).all():
        problems.append("labels outside [0, 1]")
    if not problems and not np.array_equal(frame["id"].to_numpy(), expected_ids.to_numpy()):
        problems.append("ids not in sample_submission.csv's order")
    if problems:
        raise SubmissionError("Submission rejected: " + "; ".join(problems))


def read_ids(sample_submission: str | os.PathLike) -> pd.Series:
    path = Path(sample_submission)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the submission takes its ids and their order from the "
            "competition's sample_submission.csv. Run `make data` or put it in DATA_DIR."
        )
    return pd.read_csv(path)["id"].astype(str)


def write_submission(
    run_dir: str | os.PathLike,
    sample_submission: str | os.PathLike,
    out: str | os.PathLike,
    clip_value: float | None = None,
    log=print,
) -> dict[str, float]:
    """Clip the run's test predictions and write `out` in sample_submission's id order."""
    run = runs.read_run(run_dir)
    oof, test, cv = run.oof, run.test, run.metrics
    c = (
        choose_clip(oof["label"].to_numpy(), oof["pred"].to_numpy())
        if clip_value is None
        else float(clip_value)
    )
    clipped_oof = log_loss(oof["label"], clip(oof["pred"].to_numpy(), c))
    ids = read_ids(sample_submission)
    frame = test.rename(columns={"pred": "label"})
    frame["label"] = clip(frame["label"].to_numpy(), c)
    if set(frame["id"]) == set(ids) and not frame["id"].duplicated().any():
        frame = frame.set_index("id").loc[ids].reset_index()  # sample_submission's order
    check_submission(frame, ids)
    store.write_csv(out, frame, float_format="%.6f")
    log(f"Wrote {out}")
    log(
        f"clip c={c:g} ({'from out-of-fold predictions' if clip_value is None else 'CLIP'}); "
        f"cross-validated log_loss={clipped_oof:.5f} (unclipped {cv['log_loss']:.5f}), "
        f"accuracy={cv['accuracy']:.4f}"
    )
    return {"clip": c, "cv_log_loss": clipped_oof, "cv_accuracy": cv["accuracy"]}


def score(submission: str | os.PathLike, labels: str | os.PathLike) -> dict[str, float]:
    """Log loss and accuracy of a submission against an `id,label` labels file."""
    sub = pd.read_csv(submission, dtype={"id": str})
    truth = pd.read_csv(labels, dtype={"id": str})
    merged = truth.merge(sub, on="id", how="left", suffixes=("_true", "_pred"))
    if merged["label_pred"].isna().any():
        missing = merged.loc[merged["label_pred"].isna(), "id"].tolist()
        raise SubmissionError(
            f"{submission} lacks {len(missing)} labelled ids, e.g. {missing[:10]}"
        )
    y, p = merged["label_true"].to_numpy(), merged["label_pred"].to_numpy()
    return {"log_loss": log_loss(y, p), "accuracy": float(np.mean((p > 0.5) == (y == 1)))}
