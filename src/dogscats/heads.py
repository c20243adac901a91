"""Heads: classifiers on the concatenated GAP features, as scikit-learn estimators.

    logreg    LogisticHead: normalised features (standardised, or `ssr_l2`: signed square root
              and L2 per backbone first) + LogisticRegression, C chosen by inner CV grouped by
              image (an image and its mirror are never on both sides).
    keras     KerasHead: Dropout(0.5) + Dense(1, sigmoid), early stopping on held-out rows.
    zeroshot  ZeroShotHead: no training; its one input column is the backbones' own ImageNet
              classifier's P(dog) (dog mass / dog + cat mass).
Every head follows the estimator API (`__init__` stores, `fit` sets `*_` and returns self,
`predict_proba` checks it is fitted), so `clone` and sklearn's model selection work; `input`
says which columns of a feature set it reads. Folds and the CV loop are in train.py.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedGroupKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from dogscats import config


class _Head(ClassifierMixin, BaseEstimator):
    """predict() from predict_proba(), shared by the heads; `input` names what they read."""

    input = "features"  # or "zeroshot": see features.FeatureSet.for_head

    def predict(self, X):
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class LogisticHead(_Head):
    """Normalised features, then L2 logistic regression with C picked by inner CV.

    The inner folds split by `groups` (fit's keyword: one id per image, shared by an image and
    its mirror under TTA=flip); without groups every row is its own group. `normalise`:
    "standard" standardises every feature; "ssr_l2" first takes the signed square root and
    scales each backbone's block (`blocks`: their widths, set from the feature set) to unit L2
    norm, then standardises. Only "standard" folds into one Dense layer (`dense_weights`).
    """

    def __init__(
        self,
        *,
        Cs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
        inner_folds=3,
        max_iter=3000,
        normalise="standard",
        blocks=None,
        random_state=None,
    ):
        self.Cs = Cs
        self.inner_folds = inner_folds
        self.max_iter = max_iter
        self.normalise = normalise
        self.blocks = blocks
        self.random_state = random_state

    def fit(self, X, y, X_val=None, y_val=None, groups=None):  # X_val unused: C by inner CV
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        if self.normalise not in NORMALISATIONS:
            raise ValueError(
                f"normalise must be one of {', '.join(NORMALISATIONS)}. "
                f"Received: {self.normalise!r}"
            )
        inner = inner_splits(y, groups, self.inner_folds, self.random_state)
        with warnings.catch_warnings():  # scikit-learn 1.8+ announces API changes we don't use
            warnings.simplefilter("ignore", FutureWarning)
            self.pipeline_ = self._pipeline(inner).fit(X, y)
        self.classes_ = self.pipeline_.classes_
        self.C_ = float(np.ravel(self.pipeline_[-1].C_)[0])
        self.n_iter_ = int(np.max(self.pipeline_[-1].n_iter_))
        return self

    def _pipeline(self, inner):
        steps = [BlockNormaliser(blocks=self.blocks)] if self.normalise == "ssr_l2" else []
        return make_pipeline(
            *steps,
            StandardScaler(),
            LogisticRegressionCV(
                Cs=list(self.Cs), cv=inner, scoring="neg_log_loss", max_iter=self.max_iter
            ),
        )

    def predict_proba(self, X):
        check_is_fitted(self)
        return self.pipeline_.predict_proba(validate_data(self, X, dtype=np.float32, reset=False))

    def dense_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The head as one Dense(1) on raw features: kernel (dim, 1), bias (1,).

        Folding the scaler into the weights lets fine-tuning start from this exact head.
        """
        check_is_fitted(self)
        if self.normalise != "standard":
            raise ValueError(
                f"A LogisticHead with normalise={self.normalise!r} is not one Dense layer on "
                "raw features: fine-tuning starts from normalise='standard' heads only."
            )
        scaler, logistic = self.pipeline_
        kernel = logistic.coef_[0] / scaler.scale_
        bias = logistic.intercept_[0] - np.sum(kernel * scaler.mean_)
        return kernel[:, None].astype("float32"), np.array([bias], "float32")


NORMALISATIONS = config.NORMALISATIONS


def inner_splits(y: np.ndarray, groups, n_splits: int, random_state) -> list:
    """Stratified inner folds that keep each group (an image and its mirror) on one side."""
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    splitter = StratifiedGroupKFold(n_splits, shuffle=True, random_state=random_state)
    return list(splitter.split(np.zeros(len(y)), y, groups))


FLOATS = [np.float32, np.float64]  # kept as given; anything else becomes float32


class BlockNormaliser(TransformerMixin, BaseEstimator):
    """Signed square root, then each block of columns (one backbone's features) scaled to
    unit L2 norm, so that no backbone dominates by its scale. Stateless."""

    def __init__(self, *, blocks=None):
        self.blocks = blocks

    def fit(self, X, y=None):
        validate_data(self, X, dtype=FLOATS)
        widths = self.blocks or (self.n_features_in_,)
        if sum(widths) != self.n_features_in_:
            raise ValueError(
                f"blocks {tuple(widths)} cover {sum(widths)} columns; X has {self.n_features_in_}"
            )
        return self

    def transform(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=FLOATS, reset=False)
        X = np.sign(X) * np.sqrt(np.abs(X))
        edges = np.cumsum(self.blocks or (self.n_features_in_,))[:-1]
        parts = [
            p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
            for p in np.split(X, edges, axis=1)
        ]
        return np.concatenate(parts, axis=1)


class KerasHead(_Head):
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

    def fit(self, X, y, X_val=None, y_val=None, groups=None):
        import keras

        X, y = validate_data(self, X, y, dtype=np.float32)
        self.classes_ = _binary_classes(y)
        target = self._target(y)
        if X_val is None and groups is not None:  # hold out whole images, mirrors included
            n_splits = max(2, round(1 / self.validation_fraction))
            fit_rows, stop_rows = inner_splits(target, groups, n_splits, self.random_state)[0]
            X_val, val_target = X[stop_rows], target[stop_rows]
            X, target = X[fit_rows], target[fit_rows]
        elif X_val is None:
            X, X_val, target, val_target = train_test_split(
                X,
                target,
                test_size=_validation_size(self.validation_fraction, len(target)),
                stratify=target,
                random_state=self.random_state,
            )
        else:
            X_val, val_target = np.asarray(X_val, "float32"), self._target(y_val)
        if self.random_state is not None:
            keras.utils.set_random_seed(self.random_state)
        self.model_ = build_dense_head(X.shape[1], self.dropout)
        self.model_.compile(
            optimizer=keras.optimizers.Adam(self.learning_rate), loss="binary_crossentropy"
        )
        stop = keras.callbacks.EarlyStopping(patience=self.patience, restore_best_weights=True)
        history = self.model_.fit(
            X,
            target,
            validation_data=(X_val, val_target),
            epochs=self.epochs,
            batch_size=self.batch_size,
            callbacks=[stop],
            verbose=self.verbose,
        )
        self.epochs_ = len(history.history["loss"])
        return self

    def _target(self, y) -> np.ndarray:
        """What the sigmoid learns: 1.0 for classes_[1], 0.0 for classes_[0]."""
        return (np.asarray(y) == self.classes_[1]).astype("float32")

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        # An eager call: predict() would retrace its tf.function for every new input shape.
        p = np.asarray(self.model_(X, training=False))[:, 0]
        return np.column_stack([1 - p, p])

    def __sklearn_tags__(self):
        return _binary_tags(super().__sklearn_tags__())

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


def build_dense_head(dim: int, dropout: float = 0.5, seed: int | None = None):
    """Dropout + Dense(1, sigmoid) on `dim` features; the layer `head` is shared with finetune.
    A `seed` makes the dropout masks follow the layer's seed generator on every backend (on
    PyTorch an unseeded Dropout draws from torch's global generator instead)."""
    import keras

    inputs = keras.Input((dim,), name="gap_features")
    x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head")(x)
    return keras.Model(inputs, outputs, name="dense_head")


def _validation_size(fraction: float, rows: int) -> float | int:
    """`fraction` of the rows, but at least one row of each class for a stratified split."""
    return fraction if math.ceil(fraction * rows) >= 2 else 2


def _binary_classes(y) -> np.ndarray:
    """The two labels of a binary target; the errors scikit-learn's checks expect otherwise."""
    check_classification_targets(y)
    classes = np.unique(y)
    if type_of_target(y) == "multiclass":
        raise ValueError(f"Only binary classification is supported. Received: {classes.tolist()}")
    if len(classes) != 2:
        raise ValueError(f"A binary head needs two classes; y holds {len(classes)} class")
    return classes


def _binary_tags(tags):
    tags.classifier_tags.multi_class = False
    return tags


class ZeroShotHead(_Head):
    """No training: P(dog) is the single input column (the backbones' ImageNet classifier)."""

    input = "zeroshot"

    def __init__(self, *, random_state=None):
        self.random_state = random_state  # unused: kept so every head takes the same keywords

    def fit(self, X, y, X_val=None, y_val=None, groups=None):
        validate_data(self, X, y)
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X):
        check_is_fitted(self)
        p = validate_data(self, X, reset=False)[:, 0].astype(float)
        return np.column_stack([1 - p, p])


HEADS = {"logreg": LogisticHead, "keras": KerasHead, "zeroshot": ZeroShotHead}
assert tuple(HEADS) == config.HEADS, "config.HEADS names the heads for the CLI and make"


def make_head(name: str, random_state: int = config.SEED, normalise: str = "standard") -> _Head:
    """A head by its HEAD name, seeded; `normalise` (NORM) for the heads that take it."""
    if name not in HEADS:
        raise ValueError(f"HEAD must be one of {', '.join(HEADS)}. Received: {name!r}")
    head = HEADS[name](random_state=random_state)
    if "normalise" in head.get_params():
        return head.set_params(normalise=normalise)
    if normalise != "standard":
        raise ValueError(f"NORM={normalise} is an option of HEAD=logreg only. Received: {name!r}")
    return head
