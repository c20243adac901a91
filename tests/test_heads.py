"""Heads as scikit-learn estimators: the API, sklearn's own conformance checks, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import separable, sigmoid
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from dogscats import heads


def test_logistic_head_follows_the_estimator_api():
    X, y = separable()
    head = heads.LogisticHead(random_state=0)
    with pytest.raises(NotFittedError):
        head.predict_proba(X)
    assert clone(head).get_params() == head.get_params()
    fitted = head.fit(X, y)
    assert fitted is head
    assert head.C_ in head.Cs
    assert head.score(X, y) > 0.95
    kernel, bias = head.dense_weights()
    folded = sigmoid(X @ kernel[:, 0] + bias[0])
    assert np.allclose(folded, head.predict_proba(X)[:, 1], atol=1e-5)


def test_keras_head_early_stops_pickles_and_exposes_dense_weights():
    X, y = separable()
    head = heads.KerasHead(
        epochs=50, batch_size=32, learning_rate=1e-2, patience=5, random_state=0
    ).fit(X[:150], y[:150], X[150:], y[150:])
    assert 1 <= head.epochs_ <= 50
    p = head.predict_proba(X)
    assert p.shape == (200, 2) and np.allclose(p.sum(axis=1), 1)
    assert head.score(X, y) > 0.9
    copy = pickle.loads(pickle.dumps(head))
    assert np.allclose(copy.predict_proba(X), p, atol=1e-6)
    kernel, bias = head.dense_weights()
    assert np.allclose(sigmoid(X @ kernel[:, 0] + bias[0]), p[:, 1], atol=1e-5)


def test_zeroshot_head_passes_its_column_through():
    X = np.array([[0.1], [0.9], [0.6]])
    head = heads.ZeroShotHead().fit(X, [0, 1, 1])
    assert np.allclose(head.predict_proba(X)[:, 1], X[:, 0])
    assert head.predict(X).tolist() == [0, 1, 1]


def test_make_head_names_the_valid_heads():
    assert isinstance(heads.make_head("logreg"), heads.LogisticHead)
    with pytest.raises(ValueError, match="HEAD must be one of logreg, keras, zeroshot"):
        heads.make_head("nonsense")


# Float32 matrix products of the Keras head round differently by batch order, by about 6e-8.
KERAS_EXPECTED_FAILURES = {
    "check_methods_sample_order_invariance": "float32 rounding differs with row order",
}


def _expected_failures(estimator) -> dict[str, str]:
    return KERAS_EXPECTED_FAILURES if isinstance(estimator, heads.KerasHead) else {}


@parametrize_with_checks(
    [
        heads.LogisticHead(Cs=(0.1, 1.0), inner_folds=2, random_state=0),
        heads.KerasHead(epochs=2, patience=1, random_state=0),
        heads.BlockNormaliser(),
    ],
    expected_failed_checks=_expected_failures,
)
def test_heads_pass_scikit_learns_estimator_checks(estimator, check):
    check(estimator)


def _never_split(splits, groups) -> bool:
    return all(not set(groups[fit]) & set(groups[held]) for fit, held in splits)


def test_logistic_head_inner_folds_keep_each_group_on_one_side():
    X, y = separable(n=120)
    X, y = np.concatenate([X, X + 0.01]), np.concatenate([y, y])  # each image and its mirror
    groups = np.tile(np.arange(120), 2)
    head = heads.LogisticHead(Cs=(0.1, 1.0), inner_folds=3, random_state=0)
    inner = head.fit(X, y, groups=groups).pipeline_[-1].cv
    assert len(inner) == 3 and _never_split(inner, groups)
    held = np.concatenate([h for _, h in inner])
    assert sorted(held) == list(range(240))  # a partition of the rows
    for _, h in inner:  # still stratified
        assert y[h].mean() == pytest.approx(y.mean(), abs=0.05)
    # Without groups every row is its own group: the old split, which parts mirrors.
    ungrouped = heads.LogisticHead(Cs=(0.1, 1.0), inner_folds=3, random_state=0).fit(X, y)
    assert not _never_split(ungrouped.pipeline_[-1].cv, groups)


def test_block_normaliser_scales_each_backbone_block_to_unit_norm():
    X = np.abs(np.random.default_rng(0).normal(size=(5, 7))) * [1, 1, 1, 100, 100, 100, 100]
    out = heads.BlockNormaliser(blocks=(3, 4)).fit_transform(X)
    assert np.allclose(np.linalg.norm(out[:, :3], axis=1), 1)
    assert np.allclose(np.linalg.norm(out[:, 3:], axis=1), 1)
    assert np.allclose(
        out[:, :3], np.sqrt(X[:, :3]) / np.linalg.norm(np.sqrt(X[:, :3]), axis=1)[:, None]
    )
    with pytest.raises(ValueError, match=r"blocks \(3, 3\) cover 6 columns; X has 7"):
        heads.BlockNormaliser(blocks=(3, 3)).fit(X)


def test_a_normalised_logistic_head_is_no_dense_layer():
    X, y = separable()
    head = heads.LogisticHead(Cs=(0.1,), inner_folds=2, normalise="ssr_l2").fit(X, y)
    assert head.score(X, y) > 0.95
    with pytest.raises(ValueError, match="normalise='standard' heads only"):
        head.dense_weights()


def test_keras_head_holds_out_whole_groups_for_early_stopping(monkeypatch):
    X, y = separable(n=60)
    X, y = np.concatenate([X, X + 0.01]), np.concatenate([y, y])
    groups = np.tile(np.arange(60), 2)
    calls, split = [], heads.inner_splits

    def recording(*args):
        calls.append(split(*args))
        return calls[-1]

    monkeypatch.setattr(heads, "inner_splits", recording)
    heads.KerasHead(epochs=1, random_state=0).fit(X, y, groups=groups)
    fit, held = calls[0][0]  # the first split: its held-out rows are the early-stopping rows
    assert len(held) == 12 and _never_split([(fit, held)], groups)  # 10% of the images, x2
