"""What the model reads: cached maps at the cut (augment="flip") or images ("full")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np


@dataclass
class Source:
    """What the model reads per image: cached maps (N, 2 views, h, w, c) or images (N, S, S, 3)."""

    train: np.ndarray
    test: np.ndarray
    cached: bool
    checks: dict | None = None  # {split: arrays.RowCheck} of images: rows checked as read

    @property
    def item_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[2:] if self.cached else self.train.shape[1:])

    def views(
        self, split: str, rows: np.ndarray, both: bool, pick: np.ndarray | None = None
    ) -> np.ndarray:
        """(batch, 1 or 2 views, ...) float32: both views for TTA, else one for training
        (of cached maps, view `pick[i]` of row i: 0 plain, 1 mirrored)."""
        data = self.train if split == "train" else self.test
        if self.cached:
            if both:
                return np.asarray(data[rows], np.float32)
            return np.asarray(data[rows, pick], np.float32)[:, None]
        raw = np.asarray(data[rows])
        if self.checks is not None:
            self.checks[split].rows(rows, raw)
        images = raw.astype(np.float32)
        if both:
            return np.stack([images, images[:, :, ::-1]], axis=1)
        return images[:, None]  # random flips come from the augmentation layers


class Batches(keras.utils.PyDataset):
    """Batches over the memory maps for Keras on any backend: shuffled single views for
    training (a new order and new views each epoch), both views otherwise.

    Epoch e's order and views are drawn from a generator seeded by (seed, e) alone, when the
    epoch starts (`set_epoch`, from the EpochDraws callback): a batch depends only on the seed,
    the epoch and its index. Keras may read a batch more than once (on TensorFlow it reads the
    first two to learn their shapes), and a fold resumed mid-fit sees the batches an
    uninterrupted one would.
    """

    def __init__(self, source, split, rows, labels, batch_size: int, training: bool, seed: int):
        super().__init__(workers=1, use_multiprocessing=False)
        self.source, self.split, self.rows, self.labels = source, split, rows, labels
        self.batch_size, self.training, self.seed = batch_size, training, seed
        self.order, self.pick = rows, None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if self.training:
            rng = np.random.default_rng([self.seed, epoch])
            self.order = rng.permutation(self.rows)
            self.pick = rng.integers(0, 2, len(self.rows))

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __getitem__(self, index: int):
        span = slice(index * self.batch_size, (index + 1) * self.batch_size)
        sort = np.argsort(self.order[span])  # sorted rows: sequential disk reads
        rows = self.order[span][sort]
        pick = None if self.pick is None else self.pick[span][sort]
        x = self.source.views(self.split, rows, both=not self.training, pick=pick)
        return (x,) if self.labels is None else (x, self.labels[rows, None].astype(np.float32))


class EpochDraws(keras.callbacks.Callback):
    """Makes every random draw of an epoch a function of (seed, epoch): the batches' order and
    views, and the model's own random layers (dropout, augmentation), whose seed generators
    are set at the start of each epoch. BackupAndRestore saves weights and optimizer but not
    those generators, so without this a fold resumed mid-fit would train on other dropout
    masks than an uninterrupted one. Keras numbers epochs from the start of the whole fit,
    also when it resumes."""

    def __init__(self, batches: Batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)
        for variable in self.model.non_trainable_variables:
            if variable.path.endswith("seed_generator_state"):  # keras.random.SeedGenerator
                variable.assign(np.array([self.batches.seed, epoch], variable.dtype))


def make_dataset(
    source: Source,
    split: str,
    rows: np.ndarray,
    labels: np.ndarray | None,
    batch_size: int,
    training: bool,
    seed: int = 0,
) -> Batches:
    """What `fit`, `evaluate` and `predict` read: see Batches (`seed` matters in training)."""
    return Batches(source, split, rows, labels, batch_size, training, seed)
