"""What the model reads: cached maps at the cut (augment="flip") or images ("full")."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


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
