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

from dogscats import messages, runs, store
from dogscats.plan import check_clip

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


HEADER = ("id", "label")
_MISSING_TEXT = ("", "nan", "NaN", "NA", "null")  # what pandas would read as NaN


def check_submission(
    frame: pd.DataFrame, expected_ids: pd.Series, ordered: bool = True, source: str = "Submission"
) -> pd.DataFrame:
    """What the competition's scorer checks, for the writer and for `make score` alike: the
    header `id,label`, whole-number ids, every expected id exactly once and no other, numeric
    labels, no NaN, all in [0, 1]; with `ordered`, also sample_submission's order. Returns the
    frame with ids as strings of whole numbers and labels as floats."""
    columns = tuple(str(name) for name in frame.columns)
    if columns != HEADER:
        raise SubmissionError(
            f"{source} rejected: the header must be `id,label`. Received: {','.join(columns)!r}"
        )
    raw_ids, raw_labels = frame["id"].astype(str).str.strip(), frame["label"]
    numbers = pd.to_numeric(raw_ids, errors="coerce")
    whole = numbers.notna() & (numbers % 1 == 0)
    problems = []
    if not whole.all():
        problems.append(f"ids that are not whole numbers: {raw_ids[~whole].tolist()[:10]}")
    ids = raw_ids.where(~whole, numbers[whole].astype("int64").astype(str))
    labels = pd.to_numeric(raw_labels, errors="coerce").astype(float)
    missing_text = raw_labels.astype(str).str.strip().isin(_MISSING_TEXT) | raw_labels.isna()
    not_numbers = labels.isna() & ~missing_text
    if not_numbers.any():
        problems.append(f"labels that are not numbers: {raw_labels[not_numbers].tolist()[:10]}")
    if missing_text.any():
        problems.append(f"{int(missing_text.sum())} NaN or empty labels")
    outside = labels.notna() & ~labels.between(0, 1)
    if outside.any():
        problems.append(f"{int(outside.sum())} labels outside [0, 1]")
    if ids.duplicated().any():
        problems.append(f"duplicate ids: {ids[ids.duplicated()].tolist()[:10]}")
    expected = set(expected_ids)
    missing = expected - set(ids)
    if missing:
        problems.append(f"{len(missing)} ids missing, e.g. {sorted(missing)[:10]}")
    extra = set(ids) - expected
    if extra:
        problems.append(f"{len(extra)} ids not in the expected ids, e.g. {sorted(extra)[:10]}")
    if not problems and ordered and not np.array_equal(ids.to_numpy(), expected_ids.to_numpy()):
        problems.append("ids not in sample_submission.csv's order")
    if problems:
        raise SubmissionError(f"{source} rejected: " + "; ".join(problems))
    return pd.DataFrame({"id": ids, "label": labels})


def read_csv(path: str | os.PathLike, what: str) -> pd.DataFrame:
    """A small id,... CSV read as text (checks convert), with one clear line when it is
    missing or not a CSV at all."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as error:  # empty file, ragged rows, binary
        first = messages.first_line(error)
        raise SubmissionError(f"{path} is not a readable CSV ({first}): {what}") from None


def read_submission(path: str | os.PathLike) -> pd.DataFrame:
    """The submission to score; when it is missing, the error names the submissions beside it
    (the default SUBMISSION follows BACKBONES and HEAD, which may differ from the run's)."""
    what = "give the submission CSV to score (SUBMISSION=...)"
    folder = Path(path).parent
    if not Path(path).is_file() and folder.is_dir():
        beside = sorted(folder.glob("*.csv"), key=lambda csv: csv.stat().st_mtime, reverse=True)
        if beside:
            names = messages.some_names(csv.name for csv in beside)
            what += f"; {folder} holds, newest first: {names}"
    return read_csv(path, what)


def read_ids(sample_submission: str | os.PathLike) -> pd.Series:
    """The test ids in the competition's order, from sample_submission.csv; without it, from
    the names of DATA_DIR/test (N.jpg, sorted by N, which is the sample's order)."""
    path = Path(sample_submission)
    if not path.exists():
        from dogscats.data import scan_split  # pandas only; the folder may be absent too

        print(f"Note: {path} is missing; the test ids come from {path.parent / 'test'}.")
        return scan_split(path.parent, "test")[0]["id"].astype(str).reset_index(drop=True)
    frame = read_csv(path, "re-download the competition's sample_submission.csv")
    if "id" not in frame.columns:
        raise SubmissionError(
            f"{path}: its header has no `id` column (received "
            f"{','.join(map(str, frame.columns))!r}); the first line must be `id,label`. Fix "
            "it or re-download the file."
        )
    ids = frame["id"].str.strip()
    if not ids.str.fullmatch(r"\d+").all():
        odd = ids[~ids.str.fullmatch(r"\d+")].tolist()[:10]
        raise SubmissionError(f"{path}: ids must be whole numbers, e.g. {odd}; re-download it.")
    return ids.astype("int64").astype(str).reset_index(drop=True)


def clip_and_estimate(oof: pd.DataFrame, clip_value: float | None) -> tuple[float, float]:
    """The clip of a run's submission (chosen on its out-of-fold predictions, or CLIP) and the
    out-of-fold log loss of the predictions clipped so: the submission's honest estimate."""
    if clip_value is not None:
        check_clip(str(clip_value))
    labels, predictions = oof["label"].to_numpy(), oof["pred"].to_numpy()
    c = choose_clip(labels, predictions) if clip_value is None else float(clip_value)
    return c, log_loss(labels, clip(predictions, c))


def summary(run_dir: str | os.PathLike, out: str | os.PathLike, clip_value: float | None) -> str:
    """What `make best` ends with: the submission's path, its out-of-fold estimate and, for a
    blend, each run's weight and own out-of-fold log loss."""
    run = runs.read_run(run_dir)
    c, estimate = clip_and_estimate(run.oof, clip_value)
    lines = [
        f"Submission: {out}",
        f"  out-of-fold log loss {estimate:.5f} (clip c={c:g}), accuracy "
        f"{run.metrics['accuracy']:.4f}, over {len(run.oof)} train images",
    ]
    weights = run.metrics.get("weights", {})
    if weights:
        lines[1] += " (the blend's own out-of-fold predictions: nested cross-validation)"
    for name, weight in weights.items():
        own = run.metrics["run_log_loss"][name]
        lines.append(f"  {weight:7.4f} x {name} (its out-of-fold log loss {own:.5f})")
    return "\n".join(lines)


def write_submission(
    run_dir: str | os.PathLike,
    sample_submission: str | os.PathLike,
    out: str | os.PathLike,
    clip_value: float | None = None,
    log=print,
    wait: bool = True,
) -> dict[str, float]:
    """Clip the run's test predictions and write `out` in sample_submission's id order.
    Another submission into the same folder is waited for (`wait` False: BusyError); the file
    is then written again from the finished run, the same bytes (it takes a second)."""
    with store.writer_lock(Path(out).parent, "submission", wait, log):
        return _write_submission(run_dir, sample_submission, out, clip_value, log)


def _write_submission(run_dir, sample_submission, out, clip_value, log) -> dict[str, float]:
    run = runs.read_run(run_dir)
    test, cv = run.test, run.metrics
    c, clipped_oof = clip_and_estimate(run.oof, clip_value)
    ids = read_ids(sample_submission)
    frame = test.rename(columns={"pred": "label"})
    frame["label"] = clip(frame["label"].to_numpy(), c)
    if set(frame["id"]) == set(ids) and not frame["id"].duplicated().any():
        frame = frame.set_index("id").loc[ids].reset_index()  # sample_submission's order
    check_submission(frame, ids, source=f"Submission {out}")

    def verify(partial: Path) -> None:  # what was written reads back and passes the same checks
        check_submission(read_submission(partial), ids, source=f"Submission {out}")

    store.write_csv(out, frame, verify=verify, float_format="%.6f")
    log(f"Wrote {out}")
    log(
        f"clip c={c:g} ({'from out-of-fold predictions' if clip_value is None else 'CLIP'}); "
        f"cross-validated log_loss={clipped_oof:.5f} (unclipped {cv['log_loss']:.5f}), "
        f"accuracy={cv['accuracy']:.4f}"
    )
    return {"clip": c, "cv_log_loss": clipped_oof, "cv_accuracy": cv["accuracy"]}


def score(submission: str | os.PathLike, labels: str | os.PathLike) -> dict[str, float]:
    """Log loss and accuracy of a submission against an `id,label` labels file. The submission
    must pass the checks the writer applies (any order of ids); else SubmissionError."""
    frame = read_csv(labels, "give the true labels as an id,label CSV (LABELS=...)")
    own_ids = frame["id"].str.strip() if "id" in frame else pd.Series(dtype=str)
    truth = check_submission(frame, own_ids, ordered=False, source=f"Labels {labels}")
    guesses = truth["label"][~truth["label"].isin([0, 1])]
    if len(guesses):  # e.g. sample_submission.csv given as LABELS: a score of nothing
        raise SubmissionError(
            f"Labels {labels} rejected: true labels are 0 (cat) or 1 (dog); {len(guesses):,} "
            f"label(s) are not, e.g. {guesses.tolist()[:5]}. "
            "Give the labels file (LABELS=...), not a submission."
        )
    sub = check_submission(
        read_submission(submission), truth["id"], ordered=False, source=f"Submission {submission}"
    )
    merged = truth.merge(sub, on="id", suffixes=("_true", "_pred"))
    y, p = merged["label_true"].to_numpy(), merged["label_pred"].to_numpy()
    return {"log_loss": log_loss(y, p), "accuracy": float(np.mean((p > 0.5) == (y == 1)))}
