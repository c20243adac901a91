"""How every fold trains: the defaults and the Hyperparameters that carry them.

No Keras here: the CLI and `make` may read the defaults without starting TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dogscats import config

Log = Callable[[str], None]  # where the stage reports progress (print, or a list's append)

EPOCHS = 10
# Peak Adam rate, chosen on the 3,000-image sample; the rates compared and their scores are in
# README's fine-tuning table.
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
