"""Classifiers on the concatenated GAP features, as scikit-learn estimators, and the CV loop.

Heads:
    logreg  LogisticHead: standardised features + LogisticRegression, C chosen by inner CV.
    keras   KerasHead: Dropout(0.5) + Dense(1, sigmoid), early stopping on held-out rows.
    zeroshot  no training: the backbones' own ImageNet classifier (dog mass / dog+cat mass).
Both trained heads follow the estimator API (`__init__` stores, `fit` sets `*_` and returns
self, `predict_proba` checks it is fitted), so `clone` and sklearn's model selection work.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, check_X_y

from dogscats import config
from dogscats.features import load_features

HEADS, DEFAULT_HEAD = config.HEADS, config.DEFAULT_HEAD
METHOD_VERSION = 2  # bump when a code change alters what `train` computes: finished runs redo


class _BinaryHead(ClassifierMixin, BaseEstimator):
    """predict() from predict_proba(), shared by the heads."""

    def predict(self, X):
        return (self.predict_proba(X)[:, 1] > 0.5).astype(int)


class LogisticHead(_BinaryHead):
    """Standardised features, then L2 logistic regression with C picked by inner stratified CV."""

    def __init__(
        self,
        *,
        Cs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
        inner_folds=3,
        max_iter=3000,
        random_state=None,
    ):
        self.Cs = Cs
        self.inner_folds = inner_folds
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X, y, X_val=None, y_val=None):  # X_val unused: C comes from inner CV
        X, y = check_X_y(X, y, dtype=np.float32)
        inner = StratifiedKFold(self.inner_folds, shuffle=True, random_state=self.random_state)
        with warnings.catch_warnings():  # scikit-learn 1.8+ announces API changes we don't use
            warnings.simplefilter("ignore", FutureWarning)
            self.pipeline_ = self._pipeline(inner).fit(X, y)
        self.classes_ = self.pipeline_.classes_
        self.C_ = float(np.ravel(self.pipeline_[-1].C_)[0])
        return self

    def _pipeline(self, inner):
        return make_pipeline(
            StandardScaler(),
            LogisticRegressionCV(
                Cs=list(self.Cs), cv=inner, scoring="neg_log_loss", max_iter=self.max_iter
            ),
        )

    def predict_proba(self, X):
        check_is_fitted(self)
        return self.pipeline_.predict_proba(np.asarray(X, dtype=np.float32))

    def dense_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The head as one Dense(1) on raw features: kernel (dim, 1), bias (1,).

        Folding the scaler into the weights lets fine-tuning start from this exact head.
        """
        check_is_fitted(self)
        scaler, logistic = self.pipeline_
        kernel = logistic.coef_[0] / scaler.scale_
        bias = logistic.intercept_[0] - np.sum(kernel * scaler.mean_)
        return kernel[:, None].astype("float32"), np.array([bias], "float32")


class KerasHead(_BinaryHead):
    """Dropout + Dense(1, sigmoid), the classic frozen-feature head, trained with Adam.

    `fit(X, y, X_val, y_val)` early-stops on the loss of (X_val, y_val); without them it holds
    out `validation_fraction` of X. Never pass the rows it will be scored on: the classic recipe
    stopped on the CV fold itself, which makes the out-of-fold loss optimistic. cross_validate
    holds out whole images of the fold's training rows instead (see fit_on_rows).
    """

    def __init__(
        self,
        *,
        dropout=0.5,
        learning_rate=1e-3,
        epochs=60,
        batch_size=128,
        patience=5,
        validation_fraction=0.1,
        random_state=None,
        verbose=0,
    ):
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X, y, X_val=None, y_val=None):
        import keras

        X, y = check_X_y(X, y, dtype=np.float32)
        if X_val is None:
            X, X_val, y, y_val = train_test_split(
                X,
                y,
                test_size=self.validation_fraction,
                stratify=y,
                random_state=self.random_state,
            )
        if self.random_state is not None:
            keras.utils.set_random_seed(self.random_state)
        self.model_ = build_dense_head(X.shape[1], self.dropout)
        self.model_.compile(
            optimizer=keras.optimizers.Adam(self.learning_rate), loss="binary_crossentropy"
        )
        stop = keras.callbacks.EarlyStopping(patience=self.patience, restore_best_weights=True)
        history = self.model_.fit(
            X,
            y.astype("float32"),
            validation_data=(np.asarray(X_val, "float32"), np.asarray(y_val, "float32")),
            epochs=self.epochs,
            batch_size=self.batch_size,
            callbacks=[stop],
            verbose=self.verbose,
        )
        self.epochs_ = len(history.history["loss"])
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X):
        check_is_fitted(self)
        # An eager call: predict() would retrace its tf.function for every new input shape.
        p = np.asarray(self.model_(np.asarray(X, "float32"), training=False))[:, 0]
        return np.column_stack([1 - p, p])

    def dense_weights(self) -> tuple[np.ndarray, np.ndarray]:
        check_is_fitted(self)
        kernel, bias = self.model_.get_layer("head").get_weights()
        return kernel, bias

    # Keras models do not pickle; ship the model as its `.keras` bytes so joblib works.
    def __getstate__(self):
        state = self.__dict__.copy()
        if "model_" in state:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "head.keras"
                state["model_"].save(path)
                state["model_"] = path.read_bytes()
        return state

    def __setstate__(self, state):
        if isinstance(state.get("model_"), bytes):
            import keras

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "head.keras"
                path.write_bytes(state["model_"])
                state["model_"] = keras.models.load_model(path)
        self.__dict__.update(state)


def build_dense_head(dim: int, dropout: float = 0.5):
    """Dropout + Dense(1, sigmoid) on `dim` features; the layer `head` is shared with finetune."""
    import keras

    inputs = keras.Input((dim,), name="gap_features")
    x = keras.layers.Dropout(dropout, name="head_dropout")(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head")(x)
    return keras.Model(inputs, outputs, name="dense_head")


def make_head(name: str, random_state: int = config.SEED):
    if name == "logreg":
        return LogisticHead(random_state=random_state)
    if name == "keras":
        return KerasHead(random_state=random_state)
    raise ValueError(f"HEAD must be one of {', '.join(HEADS)}. Received: {name!r}")


# ----------------------------------------------------------------------------------------------
# Feature sets and folds
# ----------------------------------------------------------------------------------------------


@dataclass
class FeatureSet:
    """Concatenated features of several backbones, aligned by id."""

    train: np.ndarray
    test: np.ndarray
    y: np.ndarray
    train_ids: np.ndarray
    test_ids: np.ndarray
    train_flip: np.ndarray | None = None
    test_flip: np.ndarray | None = None
    train_zeroshot: np.ndarray | None = None
    test_zeroshot: np.ndarray | None = None


class FeatureMismatchError(ValueError):
    pass


def load_feature_set(paths: list[str | os.PathLike], tta: str = "none") -> FeatureSet:
    """Load and concatenate feature files; their ids and labels must be identical."""
    if not paths:
        raise ValueError("No feature files given.")
    parts = {split: [load_features(p, split) for p in paths] for split in ("train", "test")}
    for split, loaded in parts.items():
        _check_aligned(paths, loaded, split)
    flip = tta == "flip"
    if flip:
        missing = [str(p) for p, d in zip(paths, parts["train"]) if "features_flip" not in d]
        if missing:
            raise FeatureMismatchError(
                f"TTA=flip needs mirrored features, missing in: {', '.join(missing)}. "
                "Run `make features TTA=flip`."
            )
    train, test = parts["train"], parts["test"]
    return FeatureSet(
        train=_concat(train, "features"),
        test=_concat(test, "features"),
        y=train[0]["labels"].astype(int),
        train_ids=train[0]["ids"],
        test_ids=test[0]["ids"],
        train_flip=_concat(train, "features_flip") if flip else None,
        test_flip=_concat(test, "features_flip") if flip else None,
        train_zeroshot=_zeroshot(train, flip),
        test_zeroshot=_zeroshot(test, flip),
    )


def _check_aligned(paths, loaded: list[dict], split: str) -> None:
    first = loaded[0]
    for path, data in zip(paths[1:], loaded[1:]):
        same_ids = np.array_equal(first["ids"], data["ids"])
        same_labels = np.array_equal(first["labels"], data["labels"])
        if not (same_ids and same_labels):
            what = "ids" if not same_ids else "labels"
            raise FeatureMismatchError(
                f"The {split} {what} of {path} differ from those of {paths[0]}: the feature "
                "files were made from different images. Re-run `make features` for both."
            )


def _concat(loaded: list[dict], name: str) -> np.ndarray:
    return np.concatenate([d[name] for d in loaded], axis=1).astype("float32")


def _zeroshot(loaded: list[dict], flip: bool) -> np.ndarray | None:
    """Mean zero-shot P(dog) over the backbones that ship an ImageNet classifier."""
    names = ["zeroshot"] + (["zeroshot_flip"] if flip else [])
    columns = [d[n] for d in loaded for n in names if n in d]
    return np.mean(columns, axis=0) if columns else None


def make_folds(y: np.ndarray, n_folds: int = 5, seed: int = config.SEED) -> np.ndarray:
    """Fold number of every train row: the one split that heads and fine-tuning share."""
    folds = np.empty(len(y), dtype=int)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, valid) in enumerate(splitter.split(np.zeros(len(y)), y)):
        folds[valid] = fold
    return folds


# ----------------------------------------------------------------------------------------------
# Cross-validation
# ----------------------------------------------------------------------------------------------


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


def scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return {
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "accuracy": float(accuracy_score(y, p > 0.5)),
    }


def predict_with_tta(model, X: np.ndarray, X_flip: np.ndarray | None) -> np.ndarray:
    p = model.predict_proba(X)[:, 1]
    if X_flip is not None:
        p = (p + model.predict_proba(X_flip)[:, 1]) / 2
    return p


def _rows_with_mirrors(data: FeatureSet, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of these train rows; mirrored features (TTA) double them."""
    X, y = data.train[rows], data.y[rows]
    if data.train_flip is not None:
        X, y = np.concatenate([X, data.train_flip[rows]]), np.concatenate([y, y])
    return X, y


def fit_on_rows(head, data: FeatureSet, rows: np.ndarray):
    """A clone of `head` fitted on these train rows (a boolean mask or row numbers).

    A head that early-stops (it has `validation_fraction`) watches a stratified share of these
    rows, split by image before the mirrors are added: an image whose mirror it trains on
    would flatter the loss it stops on.
    """
    rows = np.flatnonzero(rows) if rows.dtype == bool else rows
    stop = None
    fraction = getattr(head, "validation_fraction", None)
    if fraction:
        seed = getattr(head, "random_state", None)
        rows, stop = train_test_split(
            rows, test_size=fraction, stratify=data.y[rows], random_state=seed
        )
    X, y = _rows_with_mirrors(data, rows)
    X_val, y_val = _rows_with_mirrors(data, stop) if stop is not None else (None, None)
    return clone(head).fit(X, y, X_val=X_val, y_val=y_val)


def predict_rows(model, data: FeatureSet, rows: np.ndarray) -> np.ndarray:
    """P(dog) of these train rows, averaged with their mirror images under TTA=flip."""
    flip = data.train_flip[rows] if data.train_flip is not None else None
    return predict_with_tta(model, data.train[rows], flip)


def cross_validate(head, data: FeatureSet, folds: np.ndarray, log=print) -> CVResult:
    """Fit one clone of `head` per fold on the other folds' rows; the fold is only scored."""
    oof = np.zeros(len(data.y))
    test = np.zeros(len(data.test))
    fold_scores, models = [], []
    for fold in range(folds.max() + 1):
        fit_rows, val_rows = folds != fold, folds == fold
        model = fit_on_rows(head, data, fit_rows)
        oof[val_rows] = predict_rows(model, data, val_rows)
        test += predict_with_tta(model, data.test, data.test_flip) / (folds.max() + 1)
        fold_scores.append(scores(data.y[val_rows], oof[val_rows]))
        models.append(model)
        s = fold_scores[-1]
        log(f"fold {fold}: log_loss={s['log_loss']:.5f} accuracy={s['accuracy']:.4f}")
    return CVResult(oof, test, folds, fold_scores, models)


def zeroshot_result(data: FeatureSet, folds: np.ndarray) -> CVResult:
    if data.train_zeroshot is None:
        raise ValueError(
            "HEAD=zeroshot needs a backbone whose ImageNet classifier ships with "
            "its weights (BACKBONES=offline) and WEIGHTS=imagenet."
        )
    fold_scores = [
        scores(data.y[folds == f], data.train_zeroshot[folds == f]) for f in range(folds.max() + 1)
    ]
    return CVResult(data.train_zeroshot, data.test_zeroshot, folds, fold_scores, [])


# ----------------------------------------------------------------------------------------------
# The `train` stage
# ----------------------------------------------------------------------------------------------


def train(
    feature_files: list[str | os.PathLike],
    out: str | os.PathLike,
    head: str = DEFAULT_HEAD,
    tta: str = "none",
    n_folds: int = 5,
    seed: int = config.SEED,
    log=print,
) -> Path:
    """Cross-validate a head on the concatenated features; write the run folder atomically.

    Folder contents: oof.csv (id, label, fold, pred), test.csv (id, pred), fold_K.joblib,
    metrics.json (per-fold and overall out-of-fold log loss and accuracy, settings).
    """
    out = Path(out)
    settings = {
        "method_version": METHOD_VERSION,
        "head": head,
        "tta": tta,
        "folds": n_folds,
        "seed": seed,
        "feature_files": [str(p) for p in feature_files],
    }
    if is_up_to_date(out, settings, [Path(p) for p in feature_files], log, redo="training"):
        return out
    data = load_feature_set(feature_files, tta)
    folds = make_folds(data.y, n_folds, seed)
    log(
        f"{head} head on {data.train.shape[1]} features x {len(data.y)} images, "
        f"{n_folds} folds, TTA={tta}"
    )
    if head == "zeroshot":
        result = zeroshot_result(data, folds)
    else:
        result = cross_validate(make_head(head, seed), data, folds, log)
    metrics = {
        **result.summary(data.y),
        "head": head,
        "tta": tta,
        "folds": n_folds,
        "seed": seed,
        "feature_files": [str(p) for p in feature_files],
        "fold_scores": result.fold_scores,
        "settings": settings,
    }
    log(
        f"out-of-fold: log_loss={metrics['log_loss']:.5f} accuracy={metrics['accuracy']:.4f} "
        f"(fold std {metrics['fold_log_loss_std']:.5f})"
    )
    write_run(out, data, result, metrics)
    return out


def is_up_to_date(out: Path, settings: dict, inputs: list[Path], log=print, *, redo: str) -> bool:
    """metrics.json of run folder `out` exists, was written with these settings and is newer
    than every input. Shared by `train` and fine-tuning; `redo` says what happens if not."""
    metrics = out / "metrics.json"
    if not metrics.is_file():
        return False
    try:
        stored = json.loads(metrics.read_text()).get("settings")
    except ValueError:
        stored = None
    newer = all(metrics.stat().st_mtime >= path.stat().st_mtime for path in inputs)
    if stored == settings and newer:
        log(f"{out} is up to date: nothing to redo.")
        # make asks again whenever the code (a prerequisite) is newer than the run; the
        # settings (with METHOD_VERSION) say the run stands, so mark it fresh and make stops
        # asking. Without this, a retrained head would also make every fine-tuning run on it
        # look stale.
        os.utime(metrics)
        return True
    reason = "its inputs are newer" if stored == settings else "the settings changed"
    log(f"{out} is out of date ({reason}): {redo}.")
    return False


def write_run(out: Path, data: FeatureSet, result: CVResult, metrics: dict) -> None:
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pd.DataFrame(
        {"id": data.train_ids, "label": data.y, "fold": result.folds, "pred": result.oof}
    ).to_csv(tmp / "oof.csv", index=False)
    pd.DataFrame({"id": data.test_ids, "pred": result.test}).to_csv(tmp / "test.csv", index=False)
    for fold, model in enumerate(result.models):
        joblib.dump(model, tmp / f"fold_{fold}.joblib")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    old = out.with_name(out.name + ".old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
