"""The callbacks of one fold's fit: early stopping against the head, checkpoints, logs, resume."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import keras
import pandas as pd


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


class StopRowsScore(keras.callbacks.Callback):
    """Puts the early-stopping rows' scores into each epoch's logs as val_loss and
    val_accuracy, from `score` (train.scores of float64 predictions: the head's score to
    beat and the held-out fold's are computed the same way). Keras' own validation loss
    would not do: it is float32 and clipped at 1e-7, so a confident mistake costs it at most
    16 nats where the head's score charges its full loss, and a model that had not moved
    at all would already beat its own head. Comes before every callback that reads val_loss
    (they all see the same logs)."""

    def __init__(self, score: Callable[[], dict[str, float]]):
        super().__init__()
        self.score = score

    def on_epoch_end(self, epoch, logs=None):
        scores = self.score()
        if logs is not None:
            logs.update(val_loss=scores["log_loss"], val_accuracy=scores["accuracy"])


def tensorboard(log_dir: Path) -> keras.callbacks.Callback:
    """Event files for TensorBoard. They are written through TensorFlow; without it (JAX or
    PyTorch alone, as on an accelerator machine) there are none, and history.csv holds the
    same numbers."""
    if importlib.util.find_spec("tensorflow") is None:
        return keras.callbacks.Callback()
    if importlib.util.find_spec("tensorboard") is not None:
        return keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False)
    return EpochScalars(log_dir)


def fold_callbacks(
    fold_dir: Path,
    log_dir: Path,
    stop_score: Callable[[], dict[str, float]],
    head_loss: float,
    best_so_far: float,
    patience: int,
) -> list[keras.callbacks.Callback]:
    """Stop when the head is not beaten for `patience` epochs; keep the best weights that beat
    the head (and any best from before an interruption); back up every epoch to resume.
    val_loss is the loss on the early-stopping rows (`stop_score`, see StopRowsScore);
    head_loss the head's on the same rows, computed the same way.

    The backup comes last, so an epoch is only marked done once everything else recorded it.
    """
    return [
        StopRowsScore(stop_score),
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=patience, baseline=head_loss, restore_best_weights=True
        ),
        keras.callbacks.ModelCheckpoint(
            str(best_weights_path(fold_dir)),
            monitor="val_loss",
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=min(head_loss, best_so_far),
        ),
        tensorboard(log_dir),
        keras.callbacks.CSVLogger(str(history_path(fold_dir)), append=True),
        keras.callbacks.BackupAndRestore(str(fold_dir / "backup"), delete_checkpoint=False),
    ]


def best_weights_path(fold_dir: Path) -> Path:
    """Saved only for an epoch that beat the head on the early-stopping rows."""
    return fold_dir / "best.weights.h5"


def history_path(fold_dir: Path) -> Path:
    return fold_dir / "history.csv"


def read_history(fold_dir: Path) -> pd.DataFrame:
    """The fold's epochs so far (across interruptions): epoch, val_loss, ..."""
    path = history_path(fold_dir)
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=["epoch", "val_loss"])
    return pd.read_csv(path)
