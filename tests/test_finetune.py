"""The fine-tuning stage end to end: start from the head, cut cache, resume, up-to-date.

A random-weight backbone at a small size on a few synthetic images, 2 folds, 1-2 epochs.
(The network's parts: test_finetune_model.py.)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import h5py
import joblib
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import write_kaggle_dataset

from dogscats import arrays, config, finetune, store, train
from dogscats.backbones import build_backbone, get_backbone
from dogscats.finetune import cache, callbacks, head_run, model, stage

try:  # two shared cores: keep TensorFlow from spreading wider
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(2)
except RuntimeError:  # TensorFlow already started by another test module
    pass

SIZE = 64
BACKBONE = "resnet50"  # random weights with healthy activations (random Lite's vanish)


# ----------------------------------------------------------------------------------------------
# End to end on a tiny dataset: head run, interrupted fine-tuning, resumed fine-tuning
# ----------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


class InterruptAt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise Interrupted(f"simulated interruption after epoch {epoch}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Arrays, a weights file, and a logreg head (flip TTA) fitted on that backbone's GAP."""
    root = tmp_path_factory.mktemp("finetune")
    data_dir = write_kaggle_dataset(root / "comp", n_train=8, n_test=4, size=SIZE)
    arrays_dir = root / "arrays"
    arrays.preprocess(data_dir, SIZE, out_dir=arrays_dir, workers=1, progress=False)
    keras.utils.set_random_seed(0)
    net = build_backbone(BACKBONE, weights="random", input_size=SIZE)
    weights = root / "backbone.weights.h5"
    net.save_weights(weights)
    feature_file = root / f"{BACKBONE}.flip.h5"
    with h5py.File(feature_file, "w") as handle:  # the layout features.extract writes
        for split in ("train", "test"):
            images, index = arrays.load_split(arrays_dir, split)
            x = get_backbone(BACKBONE).preprocess_fn()(np.asarray(images, "float32"))
            group = handle.create_group(split)
            group["features"] = net.predict(x, verbose=0)
            group["features_flip"] = net.predict(x[:, :, ::-1].copy(), verbose=0)
            group["ids"] = index["id"].astype(str).to_numpy().astype("S")
            group["labels"] = index["label"].to_numpy().astype("int8")
    head_run = root / "head"
    train.train([feature_file], head_run, head="logreg", tta="flip", n_folds=2, seed=0, log=len)
    return {
        "data_dir": data_dir,
        "arrays_dir": arrays_dir,
        "weights": str(weights),
        "head_run": head_run,
        "cache_dir": root / "cache",
        "root": root,
    }


def run(tiny, out, log, epochs=2, learning_rate=1e-3, **kwargs):
    return finetune.finetune(
        tiny["data_dir"],
        BACKBONE,
        blocks=1,
        head_run=tiny["head_run"],
        weights=tiny["weights"],
        arrays_dir=tiny["arrays_dir"],
        out=out,
        epochs=epochs,
        batch_size=4,
        progress=False,
        cache_dir=tiny["cache_dir"],
        learning_rate=learning_rate,
        log=log,
        **kwargs,
    )


@pytest.fixture(scope="module")
def finished(tiny):
    """Interrupted in fold 1 after its first epoch, then run again to the end."""
    out = tiny["root"] / "run"
    first, second = [], []
    original = callbacks.fold_callbacks

    def interrupting(fold_dir, *args, **kwargs):
        extra = [InterruptAt()] if fold_dir.name == "fold_1" else []
        return original(fold_dir, *args, **kwargs) + extra

    callbacks.fold_callbacks = interrupting
    try:
        with pytest.raises(Interrupted):
            run(tiny, out, first.append)
    finally:
        callbacks.fold_callbacks = original
    work = out.with_name(out.name + ".work")
    state = {
        "fold_0_done": (work / "fold_0.joblib").is_file(),
        "backup": (work / "fold_1" / "backup").is_dir(),
        "out_exists": out.exists(),
    }
    run(tiny, out, second.append)
    return {"out": out, "first": first, "second": second, "state": state, "work": work}


@pytest.mark.backend  # make test runs these under JAX (and PyTorch) too
def test_resume_after_an_interruption_continues_where_it_stopped(finished):
    assert finished["state"] == {"fold_0_done": True, "backup": True, "out_exists": False}
    log = "\n".join(finished["second"])
    assert "Resuming the unfinished fine-tuning" in log
    assert "fold 0: done in an earlier run" in log
    history = pd.read_csv(finished["out"] / "history_1.csv")
    assert history["epoch"].tolist() == [0, 1]  # epoch 0 was not redone: resumed, not restarted
    assert not finished["work"].exists()


@pytest.mark.backend  # make test runs these under JAX (and PyTorch) too
def test_a_resumed_run_equals_an_uninterrupted_one(finished, tiny):
    """The fault test of fine-tuning: the run stopped in fold 1 after its first epoch and
    resumed leaves what a run never stopped leaves: predictions equal, bit for bit."""
    out = tiny["root"] / "uninterrupted"
    run(tiny, out, len)
    for name in ("oof.csv", "test.csv"):
        resumed = pd.read_csv(finished["out"] / name)
        whole = pd.read_csv(out / name)
        pd.testing.assert_frame_equal(resumed, whole, check_exact=True)
    drop = {"wall_s", "resumed"}
    scores = [
        [
            {k: v for k, v in fold.items() if k not in drop}
            for fold in json.loads((folder / "metrics.json").read_text())["fold_scores"]
        ]
        for folder in (finished["out"], out)
    ]
    assert scores[0] == scores[1]


def test_starts_from_the_head_and_writes_the_heads_run_format(finished, tiny):
    out = finished["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    for fold in metrics["fold_scores"]:  # before the first step the model is its head
        assert fold["stop_start_log_loss"] == pytest.approx(fold["stop_head_log_loss"], abs=2e-4)
        assert fold["stop_log_loss"] > 0 and fold["wall_s"] > 0
        head_kept = fold["kept"] == "head"
        assert (fold["finetuned_log_loss"] is None) == head_kept
        assert head_kept == (fold["stop_log_loss"] >= fold["stop_head_log_loss"])
    oof = pd.read_csv(out / "oof.csv", dtype={"id": str})
    head_oof = pd.read_csv(tiny["head_run"] / "oof.csv", dtype={"id": str})
    assert list(oof.columns) == ["id", "label", "fold", "pred"]
    assert oof[["id", "label", "fold"]].equals(head_oof[["id", "label", "fold"]])
    for fold in metrics["head_kept_folds"]:  # kept folds carry the head's predictions exactly
        rows = oof["fold"] == fold
        np.testing.assert_allclose(oof.loc[rows, "pred"], head_oof.loc[rows, "pred"])
    test = pd.read_csv(out / "test.csv")
    assert len(test) == 4 and test["pred"].between(0, 1).all()
    assert {"log_loss", "accuracy", "fold_scores", "head_log_loss"} <= metrics.keys()
    assert (out / "fold_0.joblib").is_file() and (out / "logs" / "fold_0").is_dir()


@pytest.mark.backend  # make test runs these under JAX (and PyTorch) too
def test_cut_cache_equals_the_networks_activations_at_the_cut(finished, tiny):
    spec = get_backbone(BACKBONE)
    net = build_backbone(BACKBONE, weights=tiny["weights"], input_size=SIZE, pooling=None)
    cut = model.cut_backbone(net, spec, 1)
    (folder,) = tiny["cache_dir"].iterdir()
    cached = np.load(folder / "train.npy")
    images, _ = arrays.load_split(tiny["arrays_dir"], "train")
    x = spec.preprocess_fn()(np.asarray(images, "float32"))
    for view, batch in enumerate((x, x[:, :, ::-1])):
        expected = np.asarray(cut.bottom(batch, training=False))
        assert cached.shape[2:] == expected.shape[1:]
        np.testing.assert_allclose(cached[:, view], expected, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="LiteRT exports need TF")
def test_cut_cache_on_litert_holds_the_maps_keras_writes(tiny, tmp_path, monkeypatch):
    """RUNTIME=litert for the cut cache: the bottom is exported as its own model (into
    KERAS_HOME/litert, under its own name) and its maps equal Keras's within the match
    tolerance, plain and mirrored, in the same layout."""
    pytest.importorskip("ai_edge_litert")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    spec = get_backbone(BACKBONE)
    net = build_backbone(BACKBONE, weights=tiny["weights"], input_size=SIZE, pooling=None)
    cut = model.cut_backbone(net, spec, 1)
    lines: list[str] = []
    maps = {
        runtime: cache.build_cache(
            tmp_path / runtime,
            cut,
            spec,
            tiny["arrays_dir"],
            4,
            "float32",
            False,
            lines.append,
            runtime,
        )
        for runtime in ("keras", "litert")
    }
    for split in ("train", "test"):
        lite, plain = np.asarray(maps["litert"][split]), np.asarray(maps["keras"][split])
        assert lite.shape == plain.shape and np.abs(plain).max() > 0.05
        assert np.abs(lite - plain).max() <= 1e-4 * max(1.0, float(np.abs(plain).max()))
    (export,) = (tmp_path / "keras" / "litert").glob("*.tflite")
    assert export.name.startswith(f"{BACKBONE}@cut-{cut.layer}-{SIZE}-")
    assert "Cut cache forward pass: LiteRT (XNNPACK) on the CPU" in "\n".join(lines)


def test_a_second_run_is_up_to_date_and_leaves_the_run_alone(finished, tiny):
    metrics = finished["out"] / "metrics.json"
    before = metrics.stat().st_mtime_ns
    log = []
    assert run(tiny, finished["out"], log.append) == finished["out"]
    assert log == [f"{finished['out']} is up to date: nothing to redo."]
    assert metrics.stat().st_mtime_ns == before  # make follows the version file, not a touch


def test_a_new_method_version_redoes_a_finished_run(finished, tiny, monkeypatch, tmp_path):
    stored = json.loads((finished["out"] / "metrics.json").read_text())["settings"]
    assert stored["method_version"] == config.method_version("finetune")
    bumped = tmp_path / "finetune.txt"  # a copy of the version file, one higher
    bumped.write_text(f"{config.method_version('finetune') + 1}\n")
    monkeypatch.setattr(config, "method_version_file", lambda stage: bumped)
    monkeypatch.setattr(stage, "open_work", Stop.raise_it)  # stop before any training
    log = []
    with pytest.raises(Stop):
        run(tiny, finished["out"], log.append)
    assert log == [
        f"{finished['out']} is out of date (settings changed: method_version): redoing it."
    ]


class Stop(Exception):
    @classmethod
    def raise_it(cls, *args, **kwargs):
        raise cls


class ScoresPoorly:
    """A refitted head's weights, with a confidently wrong score on the early-stopping rows."""

    def __init__(self, model):
        self.model = model

    def dense_weights(self):
        return self.model.dense_weights()

    def predict_proba(self, X):
        return np.full((len(X), 2), [0.999, 0.001])  # P(dog) = 0.001 for every image


@pytest.mark.backend
def test_full_augmentation_keeps_the_train_step_compiled_on_jax():
    """One layer that says it does not support XLA turns off the compiled train step of the
    whole model; on JAX each step would then run op by op (bench stage 8: 766 programs
    compiled in the first epoch instead of 6, and 2x slower)."""
    from dogscats.finetune.model import augmentation, compile_model

    pooled = [augmentation(), keras.layers.GlobalAveragePooling2D()]
    net = keras.Sequential([keras.Input((16, 16, 3)), *pooled, keras.layers.Dense(1, "sigmoid")])
    compile_model(net, 1e-3, steps=2, epochs=2)
    assert net.jit_compile == (keras.backend.backend() == "jax")
    x = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    trained = net.fit(x, np.ones((4, 1), "float32"), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(trained.history["loss"]).all()


@pytest.mark.backend  # make test runs these under JAX (and PyTorch) too
def test_a_fold_that_beats_the_head_keeps_its_fine_tuned_predictions(finished, tiny, monkeypatch):
    """With a score of about 3.45 to beat on the early-stopping rows, the model before any
    step (learning rate 0) beats it at once: the fine-tuned folds are kept."""
    real_refit = head_run.HeadRun.refit
    monkeypatch.setattr(head_run.HeadRun, "refit", lambda *args: ScoresPoorly(real_refit(*args)))
    log = []
    out = run(tiny, tiny["root"] / "beats", log.append, epochs=1, learning_rate=0.0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head_kept_folds"] == []
    result = joblib.load(out / "fold_0.joblib")
    assert result.kept == "finetuned" and result.best_epoch == 1
    assert result.stop_head_log_loss == pytest.approx(-np.log(0.001) / 2 - np.log(0.999) / 2)
    assert result.finetuned_log_loss == pytest.approx(metrics["fold_scores"][0]["log_loss"])
    kernel, bias = result.head_weights
    assert kernel.shape == (2048, 1) and bias.shape == (1,) and result.top_weights
    assert "kept fine-tuned" in "\n".join(log)


class ConfidentlyWrong:
    """A refitted head turned around and sharpened: on most rows P(dog) is confidently wrong
    (a logit of about 40, far past what float32 or Keras' 1e-7 clip can tell apart), as
    real heads are on a few mislabelled or ambiguous images."""

    def __init__(self, model, features: np.ndarray):
        kernel, bias = model.dense_weights()
        logits = features @ kernel[:, 0].astype(float) + float(bias[0])
        scale = -40 / np.median(np.abs(logits))
        self.kernel, self.bias = kernel * scale, bias * scale

    def dense_weights(self):
        return self.kernel, self.bias

    def predict_proba(self, X):
        p = 1 / (1 + np.exp(-(X @ self.kernel[:, 0].astype(float) + float(self.bias[0]))))
        return np.column_stack([1 - p, p])


@pytest.mark.backend  # make test runs these under JAX (and PyTorch) too
def test_a_model_that_has_not_moved_scores_as_its_head_on_confident_mistakes(tiny, monkeypatch):
    """Issue #21's fold 4: the early-stopping rows and the held-out fold must be scored as the
    head is. With learning rate 0 the model is its starting head, so its loss on the
    early-stopping rows, before and after the epoch, is the head's. Keras' validation loss
    (float32, clipped at 1e-7) charged each confident mistake at most 16 nats where the
    head's score charged ~40, so an unchanged model "beat" its head and was kept; and the
    float32 sigmoid rounded P(dog) to 1.0, which the log loss charged 34.5 nats."""
    real_refit = head_run.HeadRun.refit

    def confident(self, data, rows, seed):
        return ConfidentlyWrong(real_refit(self, data, rows, seed), data.train[rows])

    monkeypatch.setattr(head_run.HeadRun, "refit", confident)
    out = run(tiny, tiny["root"] / "confident", len, epochs=1, learning_rate=0.0)
    for fold in json.loads((out / "metrics.json").read_text())["fold_scores"]:
        assert fold["stop_head_log_loss"] > 20  # confident mistakes, past float32's reach
        assert fold["stop_start_log_loss"] == pytest.approx(fold["stop_head_log_loss"], rel=1e-3)
        assert fold["stop_log_loss"] == pytest.approx(fold["stop_head_log_loss"], rel=1e-3)


def test_full_augmentation_starts_from_the_head_through_the_whole_network(finished, tiny):
    """augment="full": images (plain + mirrored) go through preprocessing and both halves."""
    log = []
    out = run(tiny, tiny["root"] / "full", log.append, epochs=1, augment="full")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["augment"] == "full" and metrics["cache"] is None
    for fold in metrics["fold_scores"]:
        assert fold["stop_start_log_loss"] == pytest.approx(fold["stop_head_log_loss"], abs=1e-4)
    assert len(pd.read_csv(out / "oof.csv")) == 16


def _cache_settings(tiny) -> dict:
    fingerprint = arrays.read_manifest(tiny["arrays_dir"])["fingerprint"]
    return {
        "weights": "w",
        "input_size": SIZE,
        "fingerprint": fingerprint,
        "cache_dtype": "float32",
    }


def _cached(tiny, root, blocks: int, log=len) -> dict[str, np.ndarray]:
    """The cut cache of BLOCKS=`blocks` under `root`, as make finetune gets it (built, derived
    or found); batch 3, so the 16 and 4 rows end in a partial batch."""
    spec = get_backbone(BACKBONE)
    net = build_backbone(BACKBONE, weights=tiny["weights"], input_size=SIZE, pooling=None)
    settings = _cache_settings(tiny)
    job = stage.Job(
        spec=spec,
        blocks=blocks,
        augment="flip",
        weights="w",
        weights_dir=None,
        arrays_dir=tiny["arrays_dir"],
        cache_root=root,
        hp=finetune.Hyperparameters(batch_size=3),
        settings={**settings, "cut": spec.blocks[-blocks - 1]},
        progress=False,
        log=log,
    )
    source, _ = stage._cached_source(job, model.cut_backbone(net, spec, blocks))
    return {"train": np.asarray(source.train), "test": np.asarray(source.test)}


@pytest.mark.backend
def test_a_cut_above_a_cached_one_is_derived_from_the_nearest_without_the_bottom(
    tiny, tmp_path, monkeypatch
):
    """With BLOCKS=3 and BLOCKS=2 cached, BLOCKS=1's cache comes from BLOCKS=2's (the nearest):
    one block runs over its maps, plain and mirrored, and the bottom never sees an image.
    The maps equal those cached from the images."""
    spec, settings = get_backbone(BACKBONE), _cache_settings(tiny)
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    expected = _cached(tiny, alone, 1)
    for blocks in (2, 3):  # both from the images, so no error can cancel out over two derivations
        _cached(tiny, shared, blocks)
    assert cache.lower_cache(shared, spec, 3, settings, tiny["arrays_dir"]) is None
    nearest = cache.lower_cache(shared, spec, 1, settings, tiny["arrays_dir"])
    assert nearest is not None and nearest.cut == spec.blocks[-3]  # BLOCKS=2's cut

    def no_bottom(*args, **kwargs):
        raise AssertionError("the bottom ran over the images")

    monkeypatch.setattr(cache.litert, "forward", no_bottom)
    lines: list[str] = []
    derived = _cached(tiny, shared, 1, lines.append)
    assert sum("Deriving" in line and nearest.folder.name in line for line in lines) == 2
    for split in ("train", "test"):
        assert derived[split].shape == expected[split].shape
        assert np.abs(expected[split]).max() > 0.05
        np.testing.assert_allclose(derived[split], expected[split], rtol=1e-5, atol=1e-5)


def test_an_interrupted_cache_resumes_only_by_the_route_it_began(tiny, tmp_path, monkeypatch):
    """A split begun from the images and stopped is not finished from a lower cache (nor the
    other way round): the two agree within rounding only, so a cache is one route's output.
    A marker in the rows already written shows whether they were kept. And a route that
    starts afresh and is stopped before its first batch leaves no old count over the rows it
    wiped: the route before it then starts afresh too."""
    spec, settings = get_backbone(BACKBONE), _cache_settings(tiny)
    from_images = _cached(tiny, tmp_path / "alone", 1)["train"]
    _cached(tiny, tmp_path, 2)
    derived = _cached(tiny, tmp_path, 1)["train"]
    lower = cache.lower_cache(tmp_path, spec, 1, settings, tiny["arrays_dir"])
    path = cache.cache_folder(tmp_path, BACKBONE, spec.blocks[-2], settings) / "train.npy"

    def interrupted_after_three_rows(route: str, first_rows) -> None:
        partial = store.partial_path(path)
        rows = np.lib.format.open_memmap(partial, "w+", "float32", derived.shape)
        rows[:3] = first_rows
        rows.flush()
        partial.with_suffix(".json").write_text(json.dumps({"rows_done": 3, "from": route}))
        path.unlink(missing_ok=True)

    interrupted_after_three_rows("images", 1e3)
    np.testing.assert_array_equal(_cached(tiny, tmp_path, 1)["train"], derived)  # begun afresh
    interrupted_after_three_rows(lower.folder.name, 1e3)
    resumed = _cached(tiny, tmp_path, 1)["train"]
    assert (resumed[:3] == 1e3).all()  # the same route: its rows are kept
    np.testing.assert_array_equal(resumed[3:], derived[3:])

    interrupted_after_three_rows("images", from_images[:3])

    def stopped(self, batch):
        raise Interrupted("stopped before the first derived batch")

    monkeypatch.setattr(cache._Between, "__call__", stopped)
    with pytest.raises(Interrupted):
        _cached(tiny, tmp_path, 1)  # derivation begins afresh, wiping the three rows
    monkeypatch.undo()
    shutil.rmtree(lower.folder)  # so the images route is taken again
    np.testing.assert_array_equal(_cached(tiny, tmp_path, 1)["train"], from_images)


def test_a_cache_cut_short_below_is_not_derived_from(tiny, tmp_path):
    """Only a whole lower cache serves: one missing a split, or with too few rows, does not."""
    spec = get_backbone(BACKBONE)
    settings = {"weights": "w", "input_size": SIZE, "cache_dtype": "float32"}
    settings["fingerprint"] = arrays.read_manifest(tiny["arrays_dir"])["fingerprint"]
    counts = arrays.read_manifest(tiny["arrays_dir"])["counts"]
    folder = cache.cache_folder(tmp_path, BACKBONE, spec.blocks[-3], settings)
    folder.mkdir(parents=True)
    np.save(folder / "train.npy", np.zeros((counts["train"], 2, 2, 2, 1), "float32"))
    assert cache.lower_cache(tmp_path, spec, 1, settings, tiny["arrays_dir"]) is None
    np.save(folder / "test.npy", np.zeros((counts["test"] - 1, 2, 2, 2, 1), "float32"))
    assert cache.lower_cache(tmp_path, spec, 1, settings, tiny["arrays_dir"]) is None
    np.save(folder / "test.npy", np.zeros((counts["test"], 2, 2, 2, 1), "float32"))
    assert cache.lower_cache(tmp_path, spec, 1, settings, tiny["arrays_dir"]).folder == folder


def test_caches_of_an_earlier_version_of_the_arrays_are_removed(tmp_path):
    arrays_dir, root = tmp_path / "arrays", tmp_path / "cut_cache"

    def make_cache(name: str, arrays_path, fingerprint: str):
        folder = root / name
        folder.mkdir(parents=True)
        source = {"arrays": str(arrays_path.resolve()), "fingerprint": fingerprint}
        (folder / cache.CACHE_SOURCE).write_text(json.dumps(source))
        return folder

    stale = make_cache("lite0__block13_out__a", arrays_dir, "old")
    current = make_cache("lite0__block14_out__b", arrays_dir, "new")
    other_arrays = make_cache("lite0__block13_out__c", tmp_path / "other", "old")
    unstamped = root / "lite0__block13_out__d"
    unstamped.mkdir()
    log = []
    source = {"arrays": str(arrays_dir.resolve()), "fingerprint": "new"}
    cache.drop_stale_caches(root, source, log.append)
    assert not stale.exists() and current.exists() and other_arrays.exists()
    assert unstamped.exists()  # nothing says where it came from: left alone
    assert len(log) == 1 and str(stale) in log[0]


def test_a_zeroshot_head_is_refused_with_the_heads_that_can_start(tiny, tmp_path):
    """A zeroshot run keeps fold models too, but none is a dense layer to start from."""
    zeroshot = tmp_path / "zeroshot"
    shutil.copytree(tiny["head_run"], zeroshot)
    metrics = json.loads((zeroshot / "metrics.json").read_text())
    (zeroshot / "metrics.json").write_text(json.dumps({**metrics, "head": "zeroshot"}))
    _, index = arrays.load_split(tiny["arrays_dir"], "train")
    with pytest.raises(ValueError, match="needs FT_HEAD=logreg or FT_HEAD=keras"):
        head_run.load_head_run(zeroshot, index)
    with pytest.raises(FileNotFoundError, match="make train BACKBONES=<backbone> HEAD=logreg"):
        head_run.load_head_run(tmp_path / "absent", index)


def test_the_package_and_its_defaults_import_without_keras():
    """The CLI and make may read the defaults without starting TensorFlow."""
    code = (
        "import sys\n"
        "from dogscats import finetune\n"
        "from dogscats.finetune import hparams\n"
        "assert hparams.Hyperparameters().epochs == hparams.EPOCHS\n"
        "print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert callable(finetune.finetune) and finetune.finetune is stage.finetune


class InterruptAfter(keras.callbacks.Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Interrupted(f"simulated interruption after epoch {epoch}")


def test_stopped_after_random_epochs_resumes_to_the_same_run(tiny):
    """Fault injection: stopped after a random epoch of a random fold (3 epochs, 2 folds) and
    resumed, a run leaves what an uninterrupted one leaves: every epoch's losses and the
    predictions, bit for bit. FAULT_SEED draws other moments."""
    draw = random.Random(int(os.environ.get("FAULT_SEED", "0")))
    stops = draw.sample([(fold, epoch) for fold in (0, 1) for epoch in (0, 1)], 2)
    whole = run(tiny, tiny["root"] / "whole3", len, epochs=3)
    original = callbacks.fold_callbacks
    for stop_fold, stop_epoch in stops:
        out = tiny["root"] / f"stopped_{stop_fold}_{stop_epoch}"

        def interrupting(fold_dir, *args, stop_fold=stop_fold, stop_epoch=stop_epoch, **kw):
            extra = [InterruptAfter(stop_epoch)] if fold_dir.name == f"fold_{stop_fold}" else []
            return original(fold_dir, *args, **kw) + extra

        callbacks.fold_callbacks = interrupting
        try:
            with pytest.raises(Interrupted):
                run(tiny, out, len, epochs=3)
        finally:
            callbacks.fold_callbacks = original
        run(tiny, out, len, epochs=3)
        for name in ("history_0.csv", "history_1.csv", "oof.csv", "test.csv"):
            pd.testing.assert_frame_equal(
                pd.read_csv(out / name), pd.read_csv(whole / name), check_exact=True
            )
