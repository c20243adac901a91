"""SavedModel feature vectors as backbones: `savedmodel:<dir>:<size>`.

The TF Hub image feature-vector convention: the model takes a float32 batch of RGB images in
[0, 1] at size x size and returns one feature vector per image. Loaded with Keras's own
`keras.layers.TFSMLayer` (no tensorflow_hub): its `serving_default` signature when it has one,
else the restored `__call__` (TF Hub's TF2 models). A map or sequence output is pooled like any
backbone's (`layers.pooled`). The weights are inside the SavedModel: WEIGHTS=random and LAYER
do not apply. The folder and size are checked with the standard library, so make stops on a
wrong one at once.
"""

from __future__ import annotations

import functools
from pathlib import Path

from dogscats.backbones.layers import pooled
from dogscats.backbones.registry import BackboneSpec

USAGE = "savedmodel:<dir>:<size>, e.g. savedmodel:models/feature_vector:224"
ENDPOINTS = ("serving_default", "__call__")  # tried in this order
OUTPUT_KEYS = ("feature_vector", "default", "output_0")  # a signature's usual output names


def _parse(rest: str) -> tuple[Path, int]:
    folder, colon, size = rest.rpartition(":")
    if not colon or not folder or not size.isdigit() or int(size) < 1:
        raise ValueError(f"A SavedModel backbone is named {USAGE}. Received: savedmodel:{rest}")
    path = Path(folder).expanduser()
    if not (path / "saved_model.pb").is_file():
        raise ValueError(
            f"savedmodel:{rest}: there is no SavedModel in {path.resolve()} (no saved_model.pb). "
            "Fix: give the folder that tf.saved_model.save or model.export wrote (for a TF Hub "
            "model, the unpacked download)."
        )
    return path.resolve(), int(size)


def check(rest: str) -> None:
    _parse(rest)


def input_size(rest: str) -> int:
    return _parse(rest)[1]


def to_unit_range(x):
    """0-255 RGB floats to [0, 1], the convention of TF Hub image models."""
    return x / 255.0


@functools.cache
def spec(name: str, rest: str) -> BackboneSpec:
    folder, size = _parse(rest)
    model = build(str(folder), input_shape=(size, size, 3))
    return BackboneSpec(
        name=name,
        input_size=size,
        feature_dim=int(model.output_shape[-1]),
        builder="dogscats.backbones.savedmodel:build",
        builder_kwargs=(("directory", str(folder)),),
        preprocess="dogscats.backbones.savedmodel:to_unit_range",
        weights_source="savedmodel",
        min_size=size,
    )


def _layer(directory: str):
    """TFSMLayer on the first endpoint the SavedModel has."""
    import keras

    for endpoint in ENDPOINTS:
        try:
            return keras.layers.TFSMLayer(directory, call_endpoint=endpoint)
        except ValueError:
            continue
    raise ValueError(
        f"The SavedModel in {directory} has none of the endpoints {', '.join(ENDPOINTS)}: "
        "export it with a serving signature (model.export(dir) in Keras, or "
        "tf.saved_model.save(module, dir, signatures=...))."
    )


def _check_inputs(layer, directory: str, size: int) -> None:
    args, kwargs = layer.call_endpoint_fn.structured_input_signature
    specs = [*args, *kwargs.values()]
    ok = len(specs) == 1 and hasattr(specs[0], "shape")
    if ok:
        shape, dtype = specs[0].shape, specs[0].dtype
        ok = (
            shape.rank == 4
            and shape[-1] == 3
            and dtype.is_floating
            and all(d is None or d == size for d in shape[1:3])
        )
    if not ok:
        raise ValueError(
            f"The SavedModel in {directory} takes {specs} through {layer.call_endpoint}; a "
            f"feature-vector model takes one float batch of shape (None, {size}, {size}, 3) "
            "(or with None sizes) in [0, 1]. Check the folder and the size in the name."
        )


def _one_output(outputs, directory: str):
    if not isinstance(outputs, dict):
        return outputs
    if len(outputs) == 1:
        return next(iter(outputs.values()))
    for key in OUTPUT_KEYS:
        if key in outputs:
            return outputs[key]
    raise ValueError(
        f"The SavedModel in {directory} returns several outputs ({', '.join(outputs)}) and "
        f"none is named {' or '.join(OUTPUT_KEYS)}: it is not a feature-vector model."
    )


def build(
    directory: str,
    include_top: bool = False,
    weights: str | None = "imagenet",
    input_shape: tuple | None = None,
    pooling: str | None = "avg",
):
    """The keras.applications signature over a SavedModel: (batch, size, size, 3) floats in
    [0, 1] -> (batch, dim). `weights` must not be None: the weights are the SavedModel's."""
    import keras

    if include_top or weights is None or weights != "imagenet":
        raise ValueError(
            f"savedmodel:{directory}: its weights are inside the SavedModel; WEIGHTS=random, a "
            "weights file and a classifier top do not apply to it."
        )
    size = input_shape[0]
    layer = _layer(directory)
    _check_inputs(layer, directory, size)
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    features = _one_output(layer(inputs), directory)
    if pooling is not None:
        features = pooled(features)
    return keras.Model(inputs, features, name=Path(directory).name)
