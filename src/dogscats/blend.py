"""The `blend` stage: several runs' predictions combined into one run folder.

P(dog) = sigmoid(b + sum_i w_i * logit(p_i)) with every w_i >= 0, fitted on the runs'
out-of-fold predictions only (one row per image, so no split can part an image from its
mirror). Test predictions use the same weights. The blend's own out-of-fold predictions come
from nested CV: for each fold, weights fitted on the other folds' rows predict it. Those are
what oof.csv holds, what the clip is chosen on and what the reported log loss measures.
Heads, backbones and fine-tuned runs blend alike: a blend only reads run folders (runs.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit, logit

from dogscats import config, runs, store
from dogscats.train import scores

EPS = 1e-6  # predictions are clipped this far from 0 and 1 before their logit


def fit_weights(Z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative weights on the columns of Z (logits) and a bias minimising log loss.

    scikit-learn's LogisticRegression has no sign constraint, hence L-BFGS-B with bounds: the
    same convex problem (an unpenalised logistic regression) with w >= 0.
    """
    n, k = Z.shape
    sign = 2.0 * np.asarray(y, float) - 1.0

    def loss_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
        margin = sign * (Z @ theta[:k] + theta[k])
        loss = -np.mean(log_expit(margin))
        residual = -sign * expit(-margin) / n
        return loss, np.append(Z.T @ residual, residual.sum())

    start = np.append(np.full(k, 1.0 / k), 0.0)  # the plain logit average
    bounds = [(0.0, None)] * k + [(None, None)]
    result = minimize(loss_and_gradient, start, jac=True, method="L-BFGS-B", bounds=bounds)
    return result.x[:k], float(result.x[k])


def predict(Z: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    return expit(Z @ weights + bias)


def to_logits(p: np.ndarray) -> np.ndarray:
    return logit(np.clip(np.asarray(p, float), EPS, 1 - EPS))


def nested_predictions(Z: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold predictions of the blend itself: fold k by weights fitted without it."""
    out = np.zeros(len(y))
    for fold in np.unique(folds):
        rows = folds == fold
        out[rows] = predict(Z[rows], *fit_weights(Z[~rows], y[~rows]))
    return out


def _aligned(loaded: list[runs.Run]) -> tuple:
    """Each run's predictions in the first run's row order; the same images and labels."""
    first = loaded[0]
    train_ids, test_ids = first.oof["id"], first.test["id"]
    oof, test = [], []
    for run in loaded:
        o = run.oof.set_index("id")
        t = run.test.set_index("id")
        same = set(o.index) == set(train_ids) and set(t.index) == set(test_ids)
        if not same or len(o) != len(train_ids) or len(t) != len(test_ids):
            raise ValueError(
                f"{run.path} holds other images than {first.path}: blend runs of one data set "
                "(the same DATA_DIR, folds over every train image)."
            )
        if not np.array_equal(o.loc[train_ids, "label"], first.oof["label"]):
            raise ValueError(f"{run.path} has other train labels than {first.path}.")
        oof.append(o.loc[train_ids, "pred"].to_numpy(float))
        test.append(t.loc[test_ids, "pred"].to_numpy(float))
    return (
        train_ids.to_numpy(),
        first.oof["label"].to_numpy(int),
        first.oof["fold"].to_numpy(int),
        np.column_stack(oof),
        test_ids.to_numpy(),
        np.column_stack(test),
    )


def check_runs(run_dirs: list[Path]) -> None:
    """Two runs or more, each finished and still standing by make's rules (runs.stale_reason):
    a blend cannot redo a run, so a stale one is refused by name, never blended."""
    if not run_dirs:
        raise ValueError(
            "Nothing to blend: no finished run of this data set. Run `make train` first, or "
            'name runs: make blend RUNS="<run> <run>".'
        )
    if len(run_dirs) == 1:
        raise ValueError(
            f"One run is not a blend: RUNS gives only {run_dirs[0].name}. Its submission is "
            "`make submission` with its settings; or name two runs or more: "
            'make blend RUNS="<run> <run>".'
        )
    for path in run_dirs:
        if not runs.metrics_path(path).is_file():
            runs.read_run(path)  # its clear error for a folder that is not a finished run
        why = runs.stale_reason(path)
        if why is not None:
            raise ValueError(
                f"{path} is out of date ({why}): redo it (make with the settings that made it) "
                "before blending it, or leave it out of RUNS."
            )


def blend(
    run_dirs: list[str | os.PathLike], out: str | os.PathLike, log=print, wait: bool = True
) -> Path:
    """Blend the runs in `run_dirs` into the run folder `out` (weights in its metrics).
    Another blend into the same models folder is waited for (`wait` False: BusyError)."""
    out = Path(out)
    with store.writer_lock(out.parent, "blend", wait, log):  # up-to-date check inside
        return _blend([Path(p) for p in run_dirs], out, log)


def _blend(run_dirs: list[Path], out: Path, log) -> Path:
    check_runs(run_dirs)
    settings = {
        "method_version": config.method_version("blend"),
        "runs": [str(p) for p in run_dirs],
    }
    inputs = [runs.metrics_path(p) for p in run_dirs] + [config.method_version_file("blend")]
    if runs.up_to_date(out, settings, inputs, log):
        return out
    loaded = [runs.read_run(p) for p in run_dirs]
    train_ids, y, folds, oof, test_ids, test = _aligned(loaded)
    Z, Z_test = to_logits(oof), to_logits(test)
    nested = nested_predictions(Z, y, folds)
    weights, bias = fit_weights(Z, y)
    fold_scores = [scores(y[folds == k], nested[folds == k]) for k in np.unique(folds)]
    losses = [s["log_loss"] for s in fold_scores]
    names = [p.name for p in run_dirs]
    metrics = {
        **scores(y, nested),
        "fold_log_loss_std": float(np.std(losses)),
        "in_sample_log_loss": scores(y, predict(Z, weights, bias))["log_loss"],
        "head": "blend",
        "weights": dict(zip(names, weights.tolist())),
        "bias": bias,
        "run_log_loss": {name: scores(y, oof[:, i])["log_loss"] for i, name in enumerate(names)},
        "fold_scores": fold_scores,
        "settings": settings,
    }
    for name, weight in metrics["weights"].items():
        log(f"{weight:7.4f}  {name} (out-of-fold log_loss {metrics['run_log_loss'][name]:.5f})")
    log(
        f"blend of {len(names)} runs, nested out-of-fold: log_loss={metrics['log_loss']:.5f} "
        f"accuracy={metrics['accuracy']:.4f} (fold std {metrics['fold_log_loss_std']:.5f}; "
        f"in-sample {metrics['in_sample_log_loss']:.5f})"
    )
    predictions = runs.Predictions(
        train_ids, y, folds, nested, test_ids, predict(Z_test, weights, bias)
    )
    runs.write_run(out, predictions, metrics)
    return out
