"""The `train` stage: folds, the cross-validation loop, and the run folder of a head.

One owner of the folds (`make_folds`): heads and fine-tuning share the same splits. Every
fit sees only the other folds' rows; the fold itself is only scored, so the out-of-fold
predictions are an honest estimate for the clip choice, blends and reports.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import StratifiedKFold, train_test_split

from dogscats import config, runs, store
from dogscats import exclude as exclude_list
from dogscats.features import FeatureSet, load_feature_set
from dogscats.heads import make_head


def make_folds(y: np.ndarray, n_folds: int = config.FOLDS, seed: int = config.SEED) -> np.ndarray:
    """Fold number of every train row: the one split that heads and fine-tuning share."""
    folds = np.empty(len(y), dtype=int)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, valid) in enumerate(splitter.split(np.zeros(len(y)), y)):
        folds[valid] = fold
    return folds


def scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return {
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "accuracy": float(accuracy_score(y, p > 0.5)),
    }


@dataclass
class CVResult:
    oof: np.ndarray
    test: np.ndarray
    folds: np.ndarray
    fold_scores: list[dict[str, float]]
    models: list

    def summary(self, y: np.ndarray) -> dict[str, float]:
        losses = [s["log_loss"] for s in self.fold_scores]
        return {**scores(y, self.oof), "fold_log_loss_std": float(np.std(losses))}


def predict_with_tta(model, X: np.ndarray, X_flip: np.ndarray | None) -> np.ndarray:
    p = model.predict_proba(X)[:, 1]
    if X_flip is not None:
        p = (p + model.predict_proba(X_flip)[:, 1]) / 2
    return p


def _rows_with_mirrors(
    data: FeatureSet, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and groups of these train rows; mirrored features (TTA) double them.

    The group of a row is its image's row number, shared by its mirror: inner CV splits by it.
    """
    X, y, groups = data.train[rows], data.y[rows], rows
    if data.train_flip is not None:
        X, y = np.concatenate([X, data.train_flip[rows]]), np.concatenate([y, y])
        groups = np.concatenate([rows, rows])
    return X, y, groups


def fit_on_rows(head, data: FeatureSet, rows: np.ndarray):
    """A clone of `head` fitted on these train rows (a boolean mask or row numbers).

    A head that early-stops (it has `validation_fraction`) watches a stratified share of these
    rows, split by image before the mirrors are added: an image whose mirror it trains on
    would flatter the loss it stops on. Every choice the head makes inside (the inner CV of C)
    gets the rows' groups, so it splits by image too. A head with `blocks` learns the
    backbones' column blocks from the feature set.
    """
    rows = np.flatnonzero(rows) if rows.dtype == bool else rows
    stop = None
    fraction = getattr(head, "validation_fraction", None)
    if fraction:
        seed = getattr(head, "random_state", None)
        rows, stop = train_test_split(
            rows, test_size=fraction, stratify=data.y[rows], random_state=seed
        )
    X, y, groups = _rows_with_mirrors(data, rows)
    X_val, y_val, _ = _rows_with_mirrors(data, stop) if stop is not None else (None, None, None)
    model = clone(head)
    if data.blocks and model.get_params().get("blocks", ()) is None:
        model.set_params(blocks=data.blocks)
    return model.fit(X, y, X_val=X_val, y_val=y_val, groups=groups)


def predict_rows(model, data: FeatureSet, rows: np.ndarray) -> np.ndarray:
    """P(dog) of these train rows, averaged with their mirror images under TTA=flip."""
    flip = data.train_flip[rows] if data.train_flip is not None else None
    return predict_with_tta(model, data.train[rows], flip)


def cross_validate(
    head, data: FeatureSet, folds: np.ndarray, log=print, excluded: np.ndarray | None = None
) -> CVResult:
    """Fit one clone of `head` per fold on the other folds' rows; the fold is only scored.

    `excluded` (a boolean mask) rows are never fitted on, but still predicted out of fold.
    """
    data = data.for_head(head.input)
    n_folds = folds.max() + 1
    kept = np.ones(len(data.y), bool) if excluded is None else ~excluded
    oof = np.zeros(len(data.y))
    test = np.zeros(len(data.test))
    fold_scores, models = [], []
    for fold in range(n_folds):
        fit_rows, val_rows = (folds != fold) & kept, folds == fold
        model = fit_on_rows(head, data, fit_rows)
        oof[val_rows] = predict_rows(model, data, val_rows)
        test += predict_with_tta(model, data.test, data.test_flip) / n_folds
        fold_scores.append(scores(data.y[val_rows], oof[val_rows]))
        models.append(model)
        s = fold_scores[-1]
        log(f"fold {fold}: log_loss={s['log_loss']:.5f} accuracy={s['accuracy']:.4f}")
    return CVResult(oof, test, folds, fold_scores, models)


def train(
    feature_files: list[str | os.PathLike],
    out: str | os.PathLike,
    head: str = config.DEFAULT_HEAD,
    tta: str = "none",
    n_folds: int = config.FOLDS,
    seed: int = config.SEED,
    exclude: str | os.PathLike | None = None,
    normalise: str = "standard",
    log=print,
    wait: bool = True,
) -> Path:
    """Cross-validate a head on the concatenated features; write the run folder (runs.py).

    `exclude`: a list of train files (exclude.py) left out of every fold's fitting. Another
    training into the same models folder is waited for (`wait` False: store.BusyError).
    """
    out = Path(out)
    with store.writer_lock(out.parent, "train", wait, log):  # up-to-date check inside
        return _train(feature_files, out, head, tta, n_folds, seed, exclude, normalise, log)


def _train(feature_files, out, head, tta, n_folds, seed, exclude, normalise, log) -> Path:
    settings = {
        "method_version": config.method_version("train"),
        "head": head,
        "tta": tta,
        "folds": n_folds,
        "seed": seed,
        "feature_files": [str(p) for p in feature_files],
        "exclude": exclude_list.settings(exclude),
        "normalise": normalise,
    }
    # The EXCLUDE list is in the settings by content (its digest), not by its file's mtime.
    inputs = [Path(p) for p in feature_files] + [config.method_version_file("train")]
    if runs.up_to_date(out, settings, inputs, log):
        return out
    began = time.monotonic()
    estimator = make_head(head, seed, normalise)
    data = load_feature_set(feature_files, tta)
    excluded = exclude_list.excluded_rows(data.train_ids, exclude, log) if exclude else None
    folds = make_folds(data.y, n_folds, seed)  # of every row: the same folds as without EXCLUDE
    log(
        f"{head} head on {data.train.shape[1]} features x {len(data.y)} images, "
        f"{n_folds} folds, TTA={tta}"
    )
    if excluded is not None:
        log(f"EXCLUDE={exclude}: {int(excluded.sum())} train images left out of every fit")
    result = cross_validate(estimator, data, folds, log, excluded)
    kept = np.ones(len(data.y), bool) if excluded is None else ~excluded
    metrics = {
        **result.summary(data.y),
        "excluded": [] if excluded is None else data.train_ids[excluded].astype(str).tolist(),
        "exclude_file": str(exclude) if exclude else None,  # where the list was read this time
        "kept_log_loss": scores(data.y[kept], result.oof[kept])["log_loss"],
        "head": head,
        "tta": tta,
        "folds": n_folds,
        "seed": seed,
        "feature_files": [str(p) for p in feature_files],
        "fold_scores": result.fold_scores,
        "wall_s": round(time.monotonic() - began, 1),  # loading features and the folds
        "settings": settings,
    }
    log(
        f"out-of-fold: log_loss={metrics['log_loss']:.5f} accuracy={metrics['accuracy']:.4f} "
        f"(fold std {metrics['fold_log_loss_std']:.5f})"
        + (f"; on the rows kept: {metrics['kept_log_loss']:.5f}" if excluded is not None else "")
    )
    predictions = runs.Predictions(
        data.train_ids, data.y, result.folds, result.oof, data.test_ids, result.test
    )
    runs.write_run(out, predictions, metrics, models=result.models)
    return out
