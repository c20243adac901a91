"""Fine-tune the top blocks of one backbone, fold by fold, starting from the head `train` fitted.

Two ways to train the part of the backbone above the cut (model.py):
  augment="flip" (default, CPU): the frozen bottom runs once per image and once per mirrored
      image into a cache of feature maps at the cut (cache.py); each epoch feeds every
      image's plain or mirrored map to the trainable top.
  augment="full" (GPU): every image goes through the whole network each epoch, with random
      flips, crops (zoom in, shift) and small rotations from Keras preprocessing layers.
Each fold starts from the pretrained top and a head refitted without its early-stopping rows,
and keeps the head's predictions where fine-tuning never beat it (trainer.py). Validation and
test predictions average the plain and mirrored image. The stage itself, with its settings,
resume and run folder, is stage.py; the defaults are in hparams.py.

    hparams    Hyperparameters and their defaults (no Keras)
    model      the cut, the layers, FineTuneModel, build_model, compile_model
    inputs     Source and make_dataset: what the model reads
    cache      the cache of maps at the cut
    head_run   the head run to start from
    callbacks  early stopping against the head, checkpoints, logs, backups
    trainer    one fold: Trainer, FoldResult, early_stopping_split
    stage      finetune(): the `finetune` stage

Importing this package starts no Keras: `finetune` and the names below load their module on
first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "finetune": "stage",
    "Hyperparameters": "hparams",
    "cut_backbone": "model",
    "build_model": "model",
    "compile_model": "model",
    "early_stopping_split": "trainer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
