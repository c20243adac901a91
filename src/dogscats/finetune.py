"""Fine-tune the top blocks of one backbone, fold by fold, starting from the head `train` fitted.

The backbone is cut at a block boundary named in the registry (BackboneSpec.blocks, bottom to
top; BLOCKS=n unfreezes the last n). Two ways to train the part above the cut:
  augment="flip" (default, CPU): the frozen bottom runs once per image and once per mirrored
      image into a cache of feature maps at the cut (.npy memmaps in the dataset's folder);
      each epoch feeds every image's plain or mirrored map to the trainable top.
  augment="full" (GPU): every image goes through the whole network each epoch, with random
      flips, crops (zoom in, shift) and small rotations from Keras preprocessing layers.
Each fold's model is top -> GAP -> Dense(1, sigmoid). BatchNorm always runs in inference mode.
Early stopping watches a stratified share of the fold's training rows (STOP_FRACTION), never
the fold's validation rows, so the out-of-fold predictions are honest. The fold's head was
fitted on those rows too, so the Dense layer starts from a head of the same kind refitted
without them: before the first step the model predicts what that head predicts, and its loss
on the early-stopping rows is the score to beat. A fold that never beats it keeps the fold
head's own predictions. Validation and test predictions average the plain and mirrored image.

The run folder has the format of heads.write_run (oof.csv, test.csv, fold_K.joblib,
metrics.json) plus logs/ (TensorBoard) and history_K.csv. Until it is complete, the work lives
in <out>.work (per-fold results, checkpoints, backups), from which a re-run resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import joblib
import keras
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from dogscats import arrays, config, heads
from dogscats.backbones import BackboneSpec, build_backbone, get_backbone, resolve_keras_weights
from dogscats.features import batch_stream, make_forward

AUGMENTS = ("flip", "full")
EPOCHS = 10
# Peak Adam rate. Chosen on the 3,000-image sample (Lite0, BLOCKS=1) when early stopping still
# watched the scored fold: OOF 0.0386 / 0.0382 / 0.0361 / 0.0346 / 0.0381 for 1e-5 / 3e-5 /
# 1e-4 / 3e-4 / 1e-3. With honest early stopping 1e-4 and 3e-4 trade places by backbone
# (README, fine-tuning table).
LEARNING_RATE = 3e-4
BATCH_SIZE = 32
PATIENCE = 3
# Share of each fold's training rows held out to decide early stopping and whether fine-tuning
# beat the head, so that the fold being scored plays no part in training (an honest OOF).
STOP_FRACTION = 0.15
DROPOUT = 0.2
# float16 halves the cache (worth it for 2048-channel maps) but flushes tiny activations to
# zero, e.g. those of random-weight nets; float32 keeps the cut exact.
CACHE_DTYPE = "float32"
CACHE_FORMAT = 1  # bump when the cache layout changes
METHOD_VERSION = 2  # bump when a code change alters what a run computes: finished runs redo
CACHE_SOURCE = "source.json"  # in each cache folder: the arrays it was made from
SPLITS = ("train", "test")

Log = Callable[[str], None]


@dataclass(frozen=True)
class Hyperparameters:
    """How every fold trains. All of it is recorded in the run's settings: a change redoes it."""

    epochs: int = EPOCHS
    learning_rate: float = LEARNING_RATE
    batch_size: int = BATCH_SIZE
    patience: int = PATIENCE
    dropout: float = DROPOUT
    seed: int = config.SEED
    stop_fraction: float = STOP_FRACTION


@dataclass(frozen=True)
class Job:
    """What one fine-tuning run works with: decided once by finetune(), then passed whole."""

    spec: BackboneSpec
    blocks: int
    augment: str
    weights: str  # imagenet | random | a weights file
    weights_dir: str | None
    arrays_dir: Path
    cache_root: Path  # maps at the cut are cached under it
    hp: Hyperparameters
    settings: dict  # recorded in metrics.json; see heads.is_up_to_date
    progress: bool
    log: Log


# ----------------------------------------------------------------------------------------------
# Cutting a backbone at a block boundary
# ----------------------------------------------------------------------------------------------


@dataclass
class Cut:
    """A backbone split at a block boundary; both halves share the backbone's layers."""

    bottom: keras.Model  # images -> feature maps at the cut (frozen)
    top: keras.Model  # maps at the cut -> the backbone's last feature maps (trainable)
    layer: str  # the layer whose output is the cut
    first_layers: tuple[str, ...]  # the top's layers that read the cut


def _consumers(layer) -> list:
    """Layers that take `layer`'s output as input (Keras keeps no public API for this)."""
    found: dict[int, object] = {}
    for node in layer._outbound_nodes:
        found.setdefault(id(node.operation), node.operation)
    return list(found.values())


def block_end(model: keras.Model, name: str):
    """The layer whose output ends the block that the registry name `name` marks.

    Registry names are the last named layer of a block; where that layer's only consumer is a
    residual Add (Xception's are unnamed), the block ends at the Add.
    """
    layer = model.get_layer(name)
    consumers = _consumers(layer)
    if len(consumers) == 1 and isinstance(consumers[0], keras.layers.Add):
        return consumers[0]
    return layer


def check_blocks(spec: BackboneSpec, blocks: int) -> str:
    """The registry name of the cut below the top `blocks` blocks; a clear error if none."""
    if not spec.blocks:
        raise ValueError(
            f"Backbone {spec.name!r} names no block boundaries (BackboneSpec.blocks), so it "
            "cannot be fine-tuned. Fine-tunable: " + ", ".join(n for n in _fine_tunable())
        )
    if not 1 <= blocks < len(spec.blocks):
        raise ValueError(
            f"BLOCKS must be between 1 and {len(spec.blocks) - 1} for {spec.name}. "
            f"Received: {blocks!r}"
        )
    return spec.blocks[-blocks - 1]


def _fine_tunable() -> list[str]:
    from dogscats.backbones import list_backbones

    return [n for n in list_backbones() if get_backbone(n).blocks]


def cut_backbone(backbone: keras.Model, spec: BackboneSpec, blocks: int) -> Cut:
    """Split `backbone` (built with pooling=None) below its top `blocks` blocks."""
    end = block_end(backbone, check_blocks(spec, blocks))
    top = keras.Model(end.output, backbone.output, name=f"{spec.name}_top{blocks}")
    bottom = keras.Model(backbone.input, end.output, name=f"{spec.name}_bottom{blocks}")
    bottom.trainable = False
    top.trainable = True
    cut_input = top.inputs[0]._keras_history.operation
    first = tuple(layer.name for layer in _consumers(cut_input))
    return Cut(bottom, top, end.name, first)


# ----------------------------------------------------------------------------------------------
# Model: per-image network, averaged over views (plain / mirrored)
# ----------------------------------------------------------------------------------------------


class InferenceMode(keras.layers.Layer):
    """Calls a sub-model with training=False: its BatchNorm layers keep using their moving
    statistics while their scale and offset train. (A Functional model passes fit's
    training=True down to every layer, whatever training= its graph was built with.)"""

    def __init__(self, inner: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, x):
        return self.inner(x, training=False)

    def compute_output_shape(self, input_shape):
        return self.inner.compute_output_shape(input_shape)


class ViewAverage(keras.layers.Layer):
    """(batch, views, ...) -> mean over views of inner(view): one model serves training
    (1 view) and flip TTA (plain + mirrored) without a hand-written loop."""

    def __init__(self, inner: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, views, training=None):
        shape = keras.ops.shape(views)
        flat = keras.ops.reshape(views, (-1, *views.shape[2:]))
        p = self.inner(flat, training=training)
        return keras.ops.mean(keras.ops.reshape(p, (shape[0], shape[1])), axis=1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1)


class Preprocess(keras.layers.Layer):
    """The backbone's own input scaling, inside the model (augment="full")."""

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.fn = get_backbone(backbone).preprocess_fn()

    def call(self, x):
        return self.fn(x)

    def compute_output_shape(self, input_shape):
        return input_shape


def augmentation() -> keras.Sequential:
    """Random flip, rotation up to ~11 degrees, zoom-in up to 15% (a crop) and a 5% shift."""
    layers = keras.layers
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal"),
            layers.RandomRotation(0.03, fill_mode="reflect"),
            layers.RandomZoom((-0.15, 0.0), fill_mode="reflect"),
            layers.RandomTranslation(0.05, 0.05, fill_mode="reflect"),
        ],
        name="augment",
    )


@dataclass
class FineTuneModel:
    model: keras.Model  # (batch, views, *item) -> (batch, 1)
    cut: Cut
    dense_head: keras.Model  # heads.build_dense_head: its Dense layer is named "head"

    def set_start(self, top_weights: list, kernel: np.ndarray, bias: np.ndarray) -> None:
        """Backbone top as pretrained, head as fitted: the fold's starting point."""
        self.cut.top.set_weights(top_weights)
        self.dense_head.get_layer("head").set_weights([kernel, bias])

    def trained_weights(self) -> tuple[list, list]:
        return self.cut.top.get_weights(), self.dense_head.get_weights()


def build_model(
    cut: Cut, backbone: str, augment: str, item_shape: tuple[int, ...], dropout: float
) -> FineTuneModel:
    """top (+ frozen bottom and augmentation for "full") -> GAP -> Dropout -> Dense(1)."""
    inputs = keras.Input(item_shape, name="image" if augment == "full" else "cut_maps")
    x = inputs
    if augment == "full":
        x = augmentation()(x)
        x = Preprocess(backbone, name="preprocess")(x)
        x = InferenceMode(cut.bottom, name="frozen_bottom")(x)
    x = InferenceMode(cut.top, name="trainable_top")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    dense_head = heads.build_dense_head(int(x.shape[-1]), dropout)
    per_image = keras.Model(inputs, dense_head(x), name="per_image")
    views = keras.Input((None, *item_shape), name="views")
    model = keras.Model(views, ViewAverage(per_image, name="tta")(views), name="finetune")
    return FineTuneModel(model, cut, dense_head)


def compile_model(model: keras.Model, learning_rate: float, steps: int, epochs: int) -> None:
    """Adam, linear warm-up over the first epoch (the top meets gradients gently), then a
    cosine decay over the remaining epochs."""
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=max(1, steps * (epochs - 1)),
        warmup_target=learning_rate,
        warmup_steps=steps,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )


# ----------------------------------------------------------------------------------------------
# Inputs: cached maps at the cut, or images
# ----------------------------------------------------------------------------------------------


@dataclass
class Source:
    """What the model reads per image: cached maps (N, 2 views, h, w, c) or images (N, S, S, 3)."""

    train: np.ndarray
    test: np.ndarray
    cached: bool

    @property
    def item_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[2:] if self.cached else self.train.shape[1:])

    def views(self, split: str, rows: np.ndarray, both: bool, rng) -> np.ndarray:
        """(batch, 1 or 2 views, ...) float32: both views for TTA, else one for training."""
        data = self.train if split == "train" else self.test
        if self.cached:
            if both:
                return np.asarray(data[rows], np.float32)
            pick = rng.integers(0, 2, len(rows))  # plain or mirrored, drawn anew each epoch
            return np.asarray(data[rows, pick], np.float32)[:, None]
        images = np.asarray(data[rows], np.float32)
        if both:
            return np.stack([images, images[:, :, ::-1]], axis=1)
        return images[:, None]  # random flips come from the augmentation layers


def make_dataset(
    source: Source,
    split: str,
    rows: np.ndarray,
    labels: np.ndarray | None,
    batch_size: int,
    training: bool,
    rng: np.random.Generator,
):
    """tf.data over the memory maps: shuffled single views for training, both views otherwise."""
    import tensorflow as tf

    def batches() -> Iterator:
        order = rng.permutation(rows) if training else rows
        for start in range(0, len(order), batch_size):
            batch = np.sort(order[start : start + batch_size])  # sorted: sequential disk reads
            x = source.views(split, batch, both=not training, rng=rng)
            yield x if labels is None else (x, labels[batch, None].astype(np.float32))

    x_spec = tf.TensorSpec((None, 1 if training else 2, *source.item_shape), tf.float32)
    spec = x_spec if labels is None else (x_spec, tf.TensorSpec((None, 1), tf.float32))
    dataset = tf.data.Dataset.from_generator(batches, output_signature=spec)
    count = math.ceil(len(rows) / batch_size)
    return dataset.apply(tf.data.experimental.assert_cardinality(count)).prefetch(2)


# ----------------------------------------------------------------------------------------------
# The cache of feature maps at the cut
# ----------------------------------------------------------------------------------------------


def _sha1(*parts: object) -> str:
    digest = hashlib.sha1()
    for part in parts:
        digest.update(str(part).encode() + b"\0")
    return digest.hexdigest()


def cache_folder(root: Path, backbone: str, cut: str, settings: dict) -> Path:
    """One folder per backbone, cut, weights, input size, image arrays and dtype."""
    key = _sha1(
        CACHE_FORMAT,
        backbone,
        cut,
        settings["weights"],
        settings["input_size"],
        settings["fingerprint"],
        settings["cache_dtype"],
    )
    return Path(root) / f"{backbone}__{cut}__{key[:12]}"


def build_cache(
    folder: Path,
    cut: Cut,
    spec: BackboneSpec,
    arrays_dir: Path,
    batch_size: int,
    dtype: str,
    progress: bool,
    log: Log,
) -> dict[str, np.ndarray]:
    """Maps at the cut of every image, plain and mirrored: {split: (N, 2, h, w, c) memmap}."""
    source = {
        "arrays": str(Path(arrays_dir).resolve()),
        "fingerprint": arrays.read_manifest(arrays_dir)["fingerprint"],
    }
    _drop_stale_caches(folder.parent, source, log)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CACHE_SOURCE).write_text(json.dumps(source))
    forward = None
    maps = {}
    for split in SPLITS:
        path = folder / f"{split}.npy"
        if not path.is_file():
            images, _ = arrays.load_split(arrays_dir, split)
            if forward is None:  # the bottom runs at the arrays' size, whatever the registry's
                sized = dataclasses.replace(spec, input_size=int(images.shape[1]))
                forward = make_forward(cut.bottom, sized, batch_size, flip=True)
            log(f"Caching {split} maps at {cut.layer} in {path}")
            _fill_cache(path, images, forward, batch_size, dtype, progress)
        maps[split] = np.load(path, mmap_mode="r")
    return maps


def _drop_stale_caches(root: Path, source: dict, log: Log) -> None:
    """Remove caches made from an earlier version of the arrays in `source`: they can never be
    used again, and on the full data set each one takes several GB."""
    for stamp in root.glob(f"*/{CACHE_SOURCE}"):
        try:
            made_from = json.loads(stamp.read_text())
        except ValueError:
            continue
        same_arrays = made_from.get("arrays") == source["arrays"]
        if same_arrays and made_from.get("fingerprint") != source["fingerprint"]:
            log(f"Removing {stamp.parent}: made from an earlier version of {source['arrays']}")
            shutil.rmtree(stamp.parent)


def _fill_cache(path: Path, images, forward, batch_size: int, dtype: str, progress: bool):
    """Write one split under a .partial name, batch by batch; rename when complete.

    The rows done are recorded after each flushed batch, so an interrupted run continues.
    """
    partial = path.with_name(path.stem + ".partial.npy")
    state = path.with_name(path.stem + ".partial.json")
    map_shape = tuple(forward.get_concrete_function().structured_outputs[0].shape[1:])
    shape = (len(images), 2, *map_shape)
    done = _rows_done(partial, state, shape, dtype)
    out = np.lib.format.open_memmap(partial, mode="r+" if done else "w+", dtype=dtype, shape=shape)
    bar = tqdm(total=len(images), initial=done, desc=path.stem, unit="img", disable=not progress)
    for batch in batch_stream(images, batch_size, start=done):
        plain, mirrored = (output.numpy() for output in forward(batch))
        rows = min(batch_size, len(images) - done)
        out[done : done + rows, 0] = plain[:rows]
        out[done : done + rows, 1] = mirrored[:rows]
        done += rows
        out.flush()
        state.write_text(json.dumps({"rows_done": done}))
        bar.update(rows)
    bar.close()
    del out
    os.replace(partial, path)
    state.unlink(missing_ok=True)


def _rows_done(partial: Path, state: Path, shape: tuple, dtype: str) -> int:
    """Rows already in a partial cache file of the same shape, else 0 (start afresh)."""
    try:
        existing = np.load(partial, mmap_mode="r")
        if existing.shape == shape and existing.dtype == np.dtype(dtype):
            return int(json.loads(state.read_text())["rows_done"])
    except (OSError, ValueError, KeyError):
        pass
    return 0


# ----------------------------------------------------------------------------------------------
# The head run to start from
# ----------------------------------------------------------------------------------------------


@dataclass
class HeadRun:
    path: Path
    folds: np.ndarray  # fold of each train row, in the arrays' row order
    oof: np.ndarray  # the head's out-of-fold predictions, same order
    tta: str
    n_folds: int
    name: str  # logreg | keras
    feature_files: list[str]  # what it was fitted on

    def dense_weights(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        return joblib.load(self.path / f"fold_{fold}.joblib").dense_weights()

    def features(self, index: pd.DataFrame) -> heads.FeatureSet:
        """The features the head was fitted on, checked to be in the arrays' row order."""
        missing = [name for name in self.feature_files if not Path(name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{', '.join(missing)} (the features of the head in {self.path}) not found: "
                "run `make finetune`, which extracts them and refits the head."
            )
        data = heads.load_feature_set(self.feature_files, tta=self.tta)
        same_rows = np.array_equal(data.train_ids.astype(str), index["id"].astype(str))
        if not (same_rows and np.array_equal(data.y, index["label"])):
            raise ValueError(
                f"{', '.join(self.feature_files)} hold other train images than the arrays: "
                "extract them again (`make features`)."
            )
        return data

    def refit(self, data: heads.FeatureSet, rows: np.ndarray, seed: int):
        """A head of the same kind fitted on these rows only."""
        return heads.fit_on_rows(heads.make_head(self.name, seed), data, rows)


def load_head_run(path: Path, index: pd.DataFrame) -> HeadRun:
    """The head's folds and predictions, aligned by id with the train arrays."""
    if not (path / "metrics.json").is_file():
        raise FileNotFoundError(
            f"{path / 'metrics.json'} not found: fine-tuning starts from a head fitted on the "
            "same backbone's features. Run `make finetune` (it fits that head first) or "
            "`make train BACKBONES=<backbone> HEAD=logreg`."
        )
    metrics = json.loads((path / "metrics.json").read_text())
    oof = pd.read_csv(path / "oof.csv", dtype={"id": str})
    merged = index[["id", "label"]].merge(oof, on="id", how="left", suffixes=("", "_head"))
    if len(oof) != len(index) or merged["fold"].isna().any():
        raise ValueError(
            f"The head in {path} was fitted on other train images than the arrays hold "
            f"({len(oof)} vs {len(index)} rows, or other ids): refit it (`make train`)."
        )
    if not np.array_equal(merged["label"], merged["label_head"]):
        raise ValueError(f"Labels in {path / 'oof.csv'} differ from the arrays' labels.")
    n_folds = int(merged["fold"].max()) + 1
    missing = [k for k in range(n_folds) if not (path / f"fold_{k}.joblib").is_file()]
    if missing:
        raise ValueError(
            f"{path} has no fitted model for fold(s) {missing} (a zeroshot head has none): "
            "fine-tuning needs FT_HEAD=logreg or FT_HEAD=keras."
        )
    return HeadRun(
        path,
        merged["fold"].astype(int).to_numpy(),
        merged["pred"].to_numpy(float),
        metrics.get("tta", "none"),
        n_folds,
        metrics["head"],
        metrics["feature_files"],
    )


# ----------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------


class EpochScalars(keras.callbacks.Callback):
    """TensorBoard event files of the epoch logs without the `tensorboard` package (which
    Keras' TensorBoard callback needs); same train/ and validation/ layout and tags."""

    def __init__(self, log_dir: str | os.PathLike):
        super().__init__()
        self.log_dir = Path(log_dir)
        self.writers: dict = {}

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        metadata = summary_pb2.SummaryMetadata(plugin_data=plugin)
        for name, value in (logs or {}).items():
            part = "validation" if name.startswith("val_") else "train"
            if part not in self.writers:
                self.writers[part] = tf.summary.create_file_writer(str(self.log_dir / part))
            tag = "epoch_" + name.removeprefix("val_")
            with self.writers[part].as_default():
                tf.summary.write(tag, tf.constant(float(value)), step=epoch, metadata=metadata)
        for writer in self.writers.values():
            writer.flush()


def tensorboard(log_dir: Path) -> keras.callbacks.Callback:
    if importlib.util.find_spec("tensorboard") is not None:
        return keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False)
    return EpochScalars(log_dir)


def fold_callbacks(
    fold_dir: Path, log_dir: Path, head_loss: float, best_so_far: float, patience: int
) -> list[keras.callbacks.Callback]:
    """Stop when the head is not beaten for `patience` epochs; keep the best weights that beat
    the head (and any best from before an interruption); back up every epoch to resume.
    val_loss is the loss on the early-stopping rows; head_loss the head's on the same rows.

    The backup comes last, so an epoch is only marked done once everything else recorded it.
    """
    return [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=patience, baseline=head_loss, restore_best_weights=True
        ),
        keras.callbacks.ModelCheckpoint(
            str(fold_dir / "best.weights.h5"),
            monitor="val_loss",
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=min(head_loss, best_so_far),
        ),
        tensorboard(log_dir),
        keras.callbacks.CSVLogger(str(fold_dir / "history.csv"), append=True),
        keras.callbacks.BackupAndRestore(str(fold_dir / "backup"), delete_checkpoint=False),
    ]


def _history(fold_dir: Path) -> pd.DataFrame:
    path = fold_dir / "history.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=["epoch", "val_loss"])
    return pd.read_csv(path)


# ----------------------------------------------------------------------------------------------
# One fold
# ----------------------------------------------------------------------------------------------


@dataclass
class FoldResult:
    """One fold's outcome; fold_K.joblib of the run folder holds it."""

    fold: int
    kept: str  # "finetuned", or "head" when fine-tuning did not beat the head
    head_log_loss: float  # on the fold's validation rows
    finetuned_log_loss: float | None  # the kept fine-tuned model's; None when the head is kept
    # On the early-stopping rows: the head refitted without them (the score to beat), the
    # model before its first step (which starts from that head: the same loss under flip
    # TTA), and the best that fine-tuning reached.
    stop_head_log_loss: float
    stop_start_log_loss: float
    stop_log_loss: float
    epochs: int
    best_epoch: int | None
    wall_s: float
    resumed: bool
    val_pred: np.ndarray
    test_pred: np.ndarray
    top_weights: list  # weights behind this fold's predictions (Cut.top, then the dense head)
    head_weights: list

    def score(self) -> dict:
        return {
            "head_log_loss": self.head_log_loss,
            "finetuned_log_loss": self.finetuned_log_loss,
            "stop_head_log_loss": self.stop_head_log_loss,
            "stop_start_log_loss": self.stop_start_log_loss,
            "stop_log_loss": self.stop_log_loss,
            "kept": self.kept,
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "wall_s": round(self.wall_s, 1),
            "resumed": self.resumed,
        }


@dataclass
class Trainer:
    """Fine-tunes one fold at a time, each from the pretrained top and a head refitted
    without the fold's early-stopping rows."""

    job: Job
    net: FineTuneModel
    source: Source
    head: HeadRun
    features: heads.FeatureSet  # the head's, in the arrays' row order
    work: Path

    def __post_init__(self) -> None:
        self.pretrained_top = self.net.cut.top.get_weights()  # every fold starts from these
        self.hp, self.log, self.y = self.job.hp, self.job.log, self.features.y

    def run(self, fold: int) -> FoldResult:
        done = self.work / f"fold_{fold}.joblib"
        if done.is_file():
            result = joblib.load(done)
            self.log(f"fold {fold}: done in an earlier run. " + summary_line(result))
            return result
        began = time.monotonic()
        fold_dir = self.work / f"fold_{fold}"
        resumed = fold_dir.exists()
        fold_dir.mkdir(exist_ok=True)
        keras.utils.set_random_seed(self.hp.seed + fold)
        rng = np.random.default_rng(self.hp.seed + fold)
        fit_rows, stop_rows = self._stop_split(fold)
        val_rows = np.flatnonzero(self.head.folds == fold)
        head_loss = heads.scores(self.y[val_rows], self.head.oof[val_rows])["log_loss"]
        # The fold's head was fitted on the early-stopping rows too, so its loss there is
        # flattering; a head refitted without them is the start and the honest score to beat.
        start_head = self.head.refit(self.features, fit_rows, self.hp.seed + fold)
        stop_pred = heads.predict_rows(start_head, self.features, stop_rows)
        stop_head_loss = heads.scores(self.y[stop_rows], stop_pred)["log_loss"]
        self.net.set_start(self.pretrained_top, *start_head.dense_weights())
        batch_size = self.hp.batch_size
        val = make_dataset(self.source, "train", val_rows, self.y, batch_size, False, rng)
        stop = make_dataset(self.source, "train", stop_rows, self.y, batch_size, False, rng)
        test_rows = np.arange(len(self.source.test))
        test = make_dataset(self.source, "test", test_rows, None, batch_size, False, rng)
        stop_start_loss = self._loss(stop, stop_rows)
        steps = math.ceil(len(fit_rows) / batch_size)
        compile_model(self.net.model, self.hp.learning_rate, steps, self.hp.epochs)
        self.log(
            f"fold {fold}: {len(fit_rows)} train / {len(stop_rows)} early-stopping / "
            f"{len(val_rows)} validation images; on the early-stopping rows the head refitted "
            f"without them scores {stop_head_loss:.5f} (model before training "
            f"{stop_start_loss:.5f})" + (" (resuming)" if resumed else "")
        )
        if not (fold_dir / "fit_done").exists():
            self._fit(fold, fold_dir, fit_rows, stop, stop_head_loss, rng)
        history = _history(fold_dir)
        best = fold_dir / "best.weights.h5"
        # Saved only for an epoch that beat the head on the early-stopping rows (even across
        # interruptions): the validation rows are scored, never consulted.
        kept = "finetuned" if best.is_file() else "head"
        tuned_pred = tuned_loss = None
        if kept == "finetuned":
            self.net.model.load_weights(str(best))
            tuned_pred = self._predict(val)
            tuned_loss = heads.scores(self.y[val_rows], tuned_pred)["log_loss"]
        else:  # the test predictions too come from the fold's own head
            self.net.set_start(self.pretrained_top, *self.head.dense_weights(fold))
        result = FoldResult(
            fold=fold,
            kept=kept,
            head_log_loss=head_loss,
            finetuned_log_loss=tuned_loss,
            stop_head_log_loss=stop_head_loss,
            stop_start_log_loss=stop_start_loss,
            stop_log_loss=float(history["val_loss"].min()),
            epochs=int(history["epoch"].nunique()),
            best_epoch=_best_epoch(history),
            wall_s=time.monotonic() - began,
            resumed=resumed,
            val_pred=tuned_pred if kept == "finetuned" else self.head.oof[val_rows],
            test_pred=self._predict(test),
            top_weights=self.net.cut.top.get_weights(),
            head_weights=self.net.dense_head.get_weights(),
        )
        _dump_atomically(result, done)
        shutil.rmtree(fold_dir / "backup", ignore_errors=True)
        self.log(f"fold {fold}: " + summary_line(result))
        return result

    def _stop_split(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(self.head.folds != fold)
        return early_stopping_split(rows, self.y, self.hp.stop_fraction, self.hp.seed + fold)

    def _fit(self, fold, fold_dir, fit_rows, stop, stop_head_loss, rng) -> None:
        history = _history(fold_dir)
        best_so_far = float(history["val_loss"].min()) if len(history) else math.inf
        train = make_dataset(self.source, "train", fit_rows, self.y, self.hp.batch_size, True, rng)
        log_dir = self.work / "logs" / f"fold_{fold}"
        callbacks = fold_callbacks(
            fold_dir, log_dir, stop_head_loss, best_so_far, self.hp.patience
        )
        self.net.model.fit(
            train,
            validation_data=stop,
            epochs=self.hp.epochs,
            callbacks=callbacks,
            shuffle=False,  # the dataset shuffles itself, once per epoch
            verbose=1 if self.job.progress else 0,
        )
        (fold_dir / "fit_done").touch()  # a re-run goes straight to predicting

    def _predict(self, dataset) -> np.ndarray:
        return self.net.model.predict(dataset, verbose=0)[:, 0].astype(float)

    def _loss(self, dataset, rows: np.ndarray) -> float:
        return heads.scores(self.y[rows], self._predict(dataset))["log_loss"]


def early_stopping_split(
    rows: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows to train on, rows to decide early stopping on): a stratified share `fraction` of
    `rows`, the same for the same seed, so a resumed fold keeps its split."""
    n_stop = max(2, round(fraction * len(rows)))  # one of each class at least
    fit_rows, stop_rows = train_test_split(
        rows, test_size=n_stop, stratify=y[rows], random_state=seed
    )
    return np.sort(fit_rows), np.sort(stop_rows)


def _best_epoch(history: pd.DataFrame) -> int | None:
    if not len(history):
        return None
    return int(history.loc[history["val_loss"].idxmin(), "epoch"]) + 1


def summary_line(result: FoldResult) -> str:
    verdict = (
        "kept fine-tuned"
        if result.kept == "finetuned"
        else "fine-tuning did not beat the head there: kept the head's predictions"
    )
    best = f", best epoch {result.best_epoch} of {result.epochs}" if result.best_epoch else ""
    tuned = "" if result.finetuned_log_loss is None else f" -> {result.finetuned_log_loss:.5f}"
    return (
        f"validation log_loss head {result.head_log_loss:.5f}{tuned}; early-stopping rows "
        f"{result.stop_head_log_loss:.5f} -> {result.stop_log_loss:.5f}{best}; {verdict}; "
        f"{result.wall_s:.0f} s"
    )


def _dump_atomically(value: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    joblib.dump(value, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Resume and up-to-date checks
# ----------------------------------------------------------------------------------------------


def _weights_key(weights: str, seed: int) -> str:
    if weights in ("imagenet", "random"):
        return weights if weights == "imagenet" else f"random-seed{seed}"
    stat = os.stat(weights)
    return f"file:{os.path.abspath(weights)}:{stat.st_size}:{stat.st_mtime_ns}"


def open_work(out: Path, settings: dict, log: Log) -> Path:
    """The work folder: resumed when its settings match, else (said so) started afresh."""
    work = out.with_name(out.name + ".work")
    stamp = work / "settings.json"
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        if old == settings:
            done = len(list(work.glob("fold_*.joblib")))
            log(f"Resuming the unfinished fine-tuning in {work} ({done} fold(s) done).")
            return work
        changed = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
        log(f"Discarding the unfinished fine-tuning in {work}: {', '.join(changed)} changed.")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    stamp.write_text(json.dumps(settings, indent=2))
    return work


# ----------------------------------------------------------------------------------------------
# The `finetune` stage
# ----------------------------------------------------------------------------------------------


def _default_run(data_dir, name: str) -> Path:
    return config.dataset_dir(data_dir) / "models" / name


def finetune(
    data_dir: str | os.PathLike,
    backbone: str,
    blocks: int = 1,
    head_run: str | os.PathLike | None = None,
    augment: str = "flip",
    weights: str = "imagenet",
    weights_dir: str | None = None,
    arrays_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    epochs: int = EPOCHS,
    learning_rate: float = LEARNING_RATE,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    *,
    patience: int = PATIENCE,
    dropout: float = DROPOUT,
    seed: int = config.SEED,
    stop_fraction: float = STOP_FRACTION,
    cache_dir: str | os.PathLike | None = None,
    cache_dtype: str = CACHE_DTYPE,
    log: Log = print,
) -> Path:
    """Fine-tune the top `blocks` blocks of `backbone` on the head run's folds; return `out`.

    head_run: the `train` run folder of a head fitted on this backbone's features alone.
    cache_dir: where the maps at the cut are cached (default: the dataset's folder).
    """
    spec = get_backbone(backbone)
    hp = Hyperparameters(
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        patience=patience,
        dropout=dropout,
        seed=seed,
        stop_fraction=stop_fraction,
    )
    if augment not in AUGMENTS:
        raise ValueError(f"AUGMENT must be one of {', '.join(AUGMENTS)}. Received: {augment!r}")
    cut_name = check_blocks(spec, blocks)
    arrays_dir = Path(arrays_dir or config.arrays_dir(data_dir, spec.input_size))
    head_path = Path(head_run or _default_run(data_dir, f"{backbone}__{config.DEFAULT_HEAD}"))
    out = Path(out or _default_run(data_dir, f"{backbone}__finetune{blocks}__aug{augment}"))
    manifest = arrays.read_manifest(arrays_dir)
    train_images, index = arrays.load_split(arrays_dir, "train")
    head = load_head_run(head_path, index)
    settings = {
        "method_version": METHOD_VERSION,
        "backbone": backbone,
        "blocks": blocks,
        "cut": cut_name,
        "augment": augment,
        "weights": _weights_key(weights, seed),
        "input_size": int(train_images.shape[1]),
        "fingerprint": manifest["fingerprint"],
        "head_run": str(head_path.resolve()),
        "head_run_sha1": _sha1((head_path / "oof.csv").read_bytes()),
        **dataclasses.asdict(hp),
        "cache_dtype": cache_dtype if augment == "flip" else None,
    }
    inputs = [head_path / "metrics.json", arrays_dir / arrays.MANIFEST]
    inputs += [Path(weights)] if weights not in ("imagenet", "random") else []
    if heads.is_up_to_date(out, settings, inputs, log, redo="fine-tuning again"):
        return out
    if weights == "imagenet" and not spec.offline:
        resolve_keras_weights(spec, weights_dir)  # fail now, before any long work
    if head.tta != "flip":
        log(
            f"note: the head in {head_path} predicts without flip TTA; fine-tuned predictions "
            "average plain and mirrored images, so the starting loss differs slightly."
        )
    work = open_work(out, settings, log)
    began = time.monotonic()
    job = Job(
        spec=spec,
        blocks=blocks,
        augment=augment,
        weights=weights,
        weights_dir=weights_dir,
        arrays_dir=arrays_dir,
        cache_root=Path(cache_dir or config.dataset_dir(data_dir) / "cut_cache"),
        hp=hp,
        settings=settings,
        progress=progress,
        log=log,
    )
    net, source, cache_info = _prepare(job, train_images)
    _, test_index = arrays.load_split(arrays_dir, "test")
    trainer = Trainer(job, net, source, head, head.features(index), work)
    results = [trainer.run(fold) for fold in range(head.n_folds)]
    run_info = {**cache_info, "wall_s": round(time.monotonic() - began, 1)}
    _write(job, out, work, index, test_index, head, results, run_info)
    return out


def _prepare(job: Job, train_images: np.ndarray) -> tuple[FineTuneModel, Source, dict]:
    """Build and cut the backbone; cache the maps at the cut ("flip"); build the model."""
    # Seeds the random weights (the same net on every resume) and the dropout seed generators.
    spec, settings, log = job.spec, job.settings, job.log
    keras.utils.set_random_seed(job.hp.seed)
    if job.weights == "random":
        log(f"*** WEIGHTS=random: {spec.name} gets RANDOM weights (tests and dry runs). ***")
    backbone = build_backbone(
        spec.name,
        weights=job.weights,
        weights_dir=job.weights_dir,
        input_size=settings["input_size"],
        pooling=None,
    )
    cut = cut_backbone(backbone, spec, job.blocks)
    cut_shape = tuple(cut.top.inputs[0].shape[1:])
    trainable = sum(int(np.prod(w.shape)) for w in cut.top.trainable_weights)
    log(
        f"{spec.name}: fine-tuning the top {job.blocks} block(s) from "
        f"{', '.join(cut.first_layers)} (cut at {cut.layer}, maps {cut_shape}), "
        f"{trainable:,} trainable weights + head; augment={job.augment}"
    )
    cache_info: dict = {"cache": None, "cache_wall_s": 0.0}
    if job.augment == "flip":
        began = time.monotonic()
        folder = cache_folder(job.cache_root, spec.name, settings["cut"], settings)
        maps = build_cache(
            folder,
            cut,
            spec,
            job.arrays_dir,
            job.hp.batch_size,
            settings["cache_dtype"],
            job.progress,
            log,
        )
        source = Source(maps["train"], maps["test"], cached=True)
        cache_info = {"cache": str(folder), "cache_wall_s": round(time.monotonic() - began, 1)}
    else:
        test_images, _ = arrays.load_split(job.arrays_dir, "test")
        source = Source(train_images, test_images, cached=False)
    net = build_model(cut, spec.name, job.augment, source.item_shape, job.hp.dropout)
    return net, source, cache_info


def _write(
    job: Job,
    out: Path,
    work: Path,
    index: pd.DataFrame,
    test_index: pd.DataFrame,
    head: HeadRun,
    results: list[FoldResult],
    run_info: dict,
) -> None:
    """Assemble the folds into the heads' run-folder format; move logs in; drop the work."""
    settings = job.settings
    y = index["label"].to_numpy(int)
    oof = np.zeros(len(y))
    test = np.zeros(len(test_index))
    for result in results:
        oof[head.folds == result.fold] = result.val_pred
        test += result.test_pred / len(results)
    fold_scores = [
        {**heads.scores(y[head.folds == r.fold], r.val_pred), **r.score()} for r in results
    ]
    cv = heads.CVResult(oof, test, head.folds, fold_scores, results)
    metrics = {
        **cv.summary(y),
        "head": "finetune",
        "head_run": str(head.path),
        "head_log_loss": heads.scores(y, head.oof)["log_loss"],
        "backbone": settings["backbone"],
        "blocks": settings["blocks"],
        "augment": settings["augment"],
        "tta": "flip",
        "folds": head.n_folds,
        "seed": settings["seed"],
        "head_kept_folds": [r.fold for r in results if r.kept == "head"],
        **run_info,
        "fold_scores": fold_scores,
        "settings": settings,
    }
    data = heads.FeatureSet(
        train=np.empty((len(y), 0)),
        test=np.empty((len(test_index), 0)),
        y=y,
        train_ids=index["id"].to_numpy(),
        test_ids=test_index["id"].to_numpy(),
    )
    heads.write_run(out, data, cv, metrics)
    _keep_logs(work, out, len(results))
    shutil.rmtree(work, ignore_errors=True)
    job.log(
        f"out-of-fold: log_loss={metrics['log_loss']:.5f} accuracy={metrics['accuracy']:.4f} "
        f"(head {metrics['head_log_loss']:.5f}); wrote {out}"
    )


def _keep_logs(work: Path, out: Path, n_folds: int) -> None:
    """TensorBoard logs and the per-fold CSV histories go into the finished run folder."""
    if (work / "logs").is_dir():
        os.replace(work / "logs", out / "logs")
    for fold in range(n_folds):
        history = work / f"fold_{fold}" / "history.csv"
        if history.is_file():
            os.replace(history, out / f"history_{fold}.csv")
