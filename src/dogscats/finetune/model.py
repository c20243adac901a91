"""The fine-tuning network: a backbone cut at a block boundary, a GAP and the dense head.

The backbone is cut at a block boundary named in the registry (BackboneSpec.blocks, bottom to
top; BLOCKS=n unfreezes the last n). Each fold's model is top -> GAP -> Dense(1, sigmoid),
with BatchNorm always in inference mode, and averages its prediction over the views it is
given (one while training; plain and mirrored for validation and test).

Predictions (FineTuneModel.predict) are computed like the head's: the network gives each
view's GAP features, and the Dense layer and sigmoid run in float64 on the host. The model's
own float32 sigmoid rounds P(dog) above 1 - 6e-8 to exactly 1.0, which the log loss then
clips at 1e-15 (34.5 nats for a cat so called), and Keras' loss clips at 1e-7 (at most 16
nats an image): neither agrees with the head's float64 loss on a confident mistake.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from scipy.special import expit

from dogscats import heads
from dogscats.backbones import BackboneSpec, get_backbone, list_backbones

# ----------------------------------------------------------------------------------------------
# Cutting a backbone at a block boundary


@dataclass
class Cut:
    """A backbone split at a block boundary; both halves share the backbone's layers."""

    bottom: keras.Model  # images -> feature maps at the cut (frozen)
    top: keras.Model  # maps at the cut -> the backbone's last feature maps (trainable)
    layer: str  # the layer whose output is the cut
    first_layers: tuple[str, ...]  # the top's layers that read the cut


def _consumers(layer) -> list:
    """Layers that take `layer`'s output as input (Keras keeps no public API for this)."""
    found: dict[int, object] = {}
    for node in layer._outbound_nodes:
        found.setdefault(id(node.operation), node.operation)
    return list(found.values())


def block_end(model: keras.Model, name: str):
    """The layer whose output ends the block that the registry name `name` marks.

    Registry names are the last named layer of a block; where that layer's only consumer is a
    residual Add (Xception's are unnamed), the block ends at the Add.
    """
    layer = model.get_layer(name)
    consumers = _consumers(layer)
    if len(consumers) == 1 and isinstance(consumers[0], keras.layers.Add):
        return consumers[0]
    return layer


def check_blocks(spec: BackboneSpec, blocks: int) -> str:
    """The registry name of the cut below the top `blocks` blocks; a clear error if none."""
    if not spec.blocks:
        raise ValueError(
            f"Backbone {spec.name!r} names no block boundaries (BackboneSpec.blocks), so it "
            "cannot be fine-tuned. Fine-tunable: " + ", ".join(_fine_tunable())
        )
    if not 1 <= blocks < len(spec.blocks):
        raise ValueError(
            f"BLOCKS must be between 1 and {len(spec.blocks) - 1} for {spec.name}. "
            f"Received: {blocks!r}"
        )
    return spec.blocks[-blocks - 1]


def _fine_tunable() -> list[str]:
    return [name for name in list_backbones() if get_backbone(name).blocks]


def cut_backbone(backbone: keras.Model, spec: BackboneSpec, blocks: int) -> Cut:
    """Split `backbone` (built with pooling=None) below its top `blocks` blocks."""
    end = block_end(backbone, check_blocks(spec, blocks))
    top = keras.Model(end.output, backbone.output, name=f"{spec.name}_top{blocks}")
    bottom = keras.Model(backbone.input, end.output, name=f"{spec.name}_bottom{blocks}")
    bottom.trainable = False
    top.trainable = True
    cut_input = top.inputs[0]._keras_history.operation
    first = tuple(layer.name for layer in _consumers(cut_input))
    return Cut(bottom, top, end.name, first)


# ----------------------------------------------------------------------------------------------
# Layers: per-image network, averaged over views (plain / mirrored)


class InferenceMode(keras.layers.Layer):
    """Calls a sub-model with training=False: its BatchNorm layers keep using their moving
    statistics while their scale and offset train. (A Functional model passes fit's
    training=True down to every layer, whatever training= its graph was built with.)"""

    def __init__(self, inner: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, x):
        return self.inner(x, training=False)

    def compute_output_shape(self, input_shape):
        return self.inner.compute_output_shape(input_shape)


class ViewAverage(keras.layers.Layer):
    """(batch, views, ...) -> mean over views of inner(view): one model serves training
    (1 view) and flip TTA (plain + mirrored) without a hand-written loop."""

    def __init__(self, inner: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, views, training=None):
        shape = keras.ops.shape(views)
        flat = keras.ops.reshape(views, (-1, *views.shape[2:]))
        p = self.inner(flat, training=training)
        return keras.ops.mean(keras.ops.reshape(p, (shape[0], shape[1])), axis=1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1)


class PerView(keras.layers.Layer):
    """(batch, views, ...) -> (batch, views, features): inner(view) of every view, in inference
    mode (the GAP features that FineTuneModel.predict scores on the host)."""

    def __init__(self, inner: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, views):
        shape = keras.ops.shape(views)
        flat = keras.ops.reshape(views, (-1, *views.shape[2:]))
        features = self.inner(flat, training=False)
        return keras.ops.reshape(features, (shape[0], shape[1], features.shape[-1]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], *self.inner.output_shape[1:])


class Preprocess(keras.layers.Layer):
    """The backbone's own input scaling, inside the model (augment="full")."""

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.fn = get_backbone(backbone).preprocess_fn()

    def call(self, x):
        return self.fn(x)

    def compute_output_shape(self, input_shape):
        return input_shape


def augmentation() -> keras.Sequential:
    """Random flip, rotation up to ~11 degrees, zoom-in up to 15% (a crop) and a 5% shift."""
    layers = keras.layers
    random = [
        layers.RandomFlip("horizontal"),
        layers.RandomRotation(0.03, fill_mode="reflect"),
        layers.RandomZoom((-0.15, 0.0), fill_mode="reflect"),
        layers.RandomTranslation(0.05, 0.05, fill_mode="reflect"),
    ]
    if keras.backend.backend() == "jax":
        # RandomZoom and RandomTranslation declare supports_jit=False, for TensorFlow's
        # image transform under XLA; Keras then compiles no train step for the whole model,
        # and on JAX every step runs op by op (bench stage 8). Their JAX transform traces.
        for layer in random:
            layer.supports_jit = True
    return keras.Sequential(random, name="augment")


# ----------------------------------------------------------------------------------------------
# The model of one fold


@dataclass
class FineTuneModel:
    model: keras.Model  # (batch, views, *item) -> (batch, 1): what fit trains
    cut: Cut
    dense_head: keras.Model  # heads.build_dense_head: its Dense layer is named "head"
    view_features: keras.Model  # (batch, views, *item) -> (batch, views, GAP features)

    def set_start(self, top_weights: list, kernel: np.ndarray, bias: np.ndarray) -> None:
        """Backbone top as pretrained, head as fitted: the fold's starting point."""
        self.cut.top.set_weights(top_weights)
        self.dense_head.get_layer("head").set_weights([kernel, bias])

    def trained_weights(self) -> tuple[list, list]:
        return self.cut.top.get_weights(), self.dense_head.get_weights()

    def predict(self, dataset) -> np.ndarray:
        """P(dog) of every item of `dataset`, averaged over its views, in float64 (see the
        module's docstring): what the head would predict from these features."""
        features = self.view_features.predict(dataset, verbose=0).astype(np.float64)
        kernel, bias = self.dense_head.get_layer("head").get_weights()
        logits = features @ kernel.astype(np.float64)[:, 0] + float(bias[0])
        return expit(logits).mean(axis=1)


def build_model(
    cut: Cut, backbone: str, augment: str, item_shape: tuple[int, ...], dropout: float
) -> FineTuneModel:
    """top (+ frozen bottom and augmentation for "full") -> GAP -> Dropout -> Dense(1)."""
    inputs = keras.Input(item_shape, name="image" if augment == "full" else "cut_maps")
    x = inputs
    if augment == "full":
        x = augmentation()(x)
        x = Preprocess(backbone, name="preprocess")(x)
        x = InferenceMode(cut.bottom, name="frozen_bottom")(x)
    x = InferenceMode(cut.top, name="trainable_top")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    # Seeded so that inputs.EpochDraws, which sets the seed generators per epoch, also decides
    # the masks on PyTorch (the value itself is overwritten every epoch).
    dense_head = heads.build_dense_head(int(x.shape[-1]), dropout, seed=0)
    per_image = keras.Model(inputs, dense_head(x), name="per_image")
    features = keras.Model(inputs, x, name="per_image_features")  # the same layers, to GAP
    views = keras.Input((None, *item_shape), name="views")
    model = keras.Model(views, ViewAverage(per_image, name="tta")(views), name="finetune")
    view_features = keras.Model(views, PerView(features, name="per_view")(views), name="features")
    return FineTuneModel(model, cut, dense_head, view_features)


def compile_model(model: keras.Model, learning_rate: float, steps: int, epochs: int) -> None:
    """Adam, linear warm-up over the first epoch (the top meets gradients gently), then a
    cosine decay over the remaining epochs."""
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=max(1, steps * (epochs - 1)),
        warmup_target=learning_rate,
        warmup_steps=steps,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
