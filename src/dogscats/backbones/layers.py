"""Pooling a backbone's output to one vector per image, and features from an inner layer.

`pooled` is the one rule every source uses: a (batch, height, width, channels) map is averaged
over height and width, a (batch, tokens, dim) sequence over its tokens (a ViT's class and
register tokens included), a (batch, dim) vector is kept. `make layers` lists the layers one
may pool instead of the last (`LAYER=`); an unknown name suggests the closest ones. Keras is
imported inside the functions: the package stays standard-library at import time.
"""

from __future__ import annotations

import functools

from dogscats.backbones.registry import BackboneSpec, did_you_mean, get_backbone


def pooled(x):
    """Global average over every axis between the batch and the last one."""
    import keras

    rank = len(x.shape)
    if rank == 4:
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if rank == 3:
        return keras.layers.GlobalAveragePooling1D(name="token_avg_pool")(x)
    if rank == 2:
        return x
    raise ValueError(f"Cannot pool an output of shape {tuple(x.shape)} to one vector per image.")


def pooled_at(model, layer: str):
    """A model from the same inputs to the pooled output of `layer` (weights shared)."""
    import keras

    check_layer(model, layer)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, pooled(model.get_layer(layer).output), name=model.name)


def poolable_layers(model) -> dict[str, tuple]:
    """Every layer but the inputs with one output of rank 2 to 4, in graph order: name ->
    output shape."""
    import keras

    shapes = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        output = layer.output
        if hasattr(output, "shape") and 2 <= len(output.shape) <= 4:
            shapes[layer.name] = tuple(output.shape)
    return shapes


def _geometry_layers() -> tuple[type, ...]:
    import keras

    return (keras.layers.ZeroPadding2D, keras.layers.Cropping2D)


def block_ends(model, spec: BackboneSpec) -> dict[str, tuple]:
    """The layers worth pooling: the entry's fine-tune block ends where it names them; else the
    last layer at each spatial size below the input's (stage ends of a convolutional net), or
    for a sequence model every top-level layer; the top layer always."""
    shapes = poolable_layers(model)
    if spec.blocks:
        names = [name for name in spec.blocks if name in shapes]
    else:
        input_size = tuple(model.inputs[0].shape[1:3])
        last_at_size: dict[tuple, str] = {}
        for name, shape in shapes.items():
            if len(shape) < 4 or shape[1:3] in (input_size, (1, 1)):
                continue  # the model's own rescaling, squeeze-excitation, pooled vectors
            if isinstance(model.get_layer(name), _geometry_layers()):
                continue  # padding and cropping only prepare the next convolution
            last_at_size[shape[1:3]] = name
        names = sorted(last_at_size.values(), key=list(shapes).index)
        if all(len(shape) < 4 for shape in shapes.values()):
            names = list(shapes)
    top = list(shapes)[-1]
    if top not in names:
        names.append(top)
    return {name: shapes[name] for name in names}


def check_layer(model, layer: str) -> None:
    """A ValueError naming the closest layer names when `layer` cannot be pooled."""
    shapes = poolable_layers(model)
    if layer in shapes:
        return
    hint = did_you_mean(layer, shapes, count=5)
    raise ValueError(
        f"LAYER={layer}: {model.name} has no layer of that name with one output to pool.{hint} "
        "`make layers BACKBONE=<name>` lists the block ends. "
        f"Received: {layer!r}"
    )


@functools.cache
def layer_dim(name: str, layer: str) -> int:
    """Feature dim of `layer` pooled, checking the name first; the graph only, no weights."""
    model = symbolic_backbone(name)
    check_layer(model, layer)
    return int(model.get_layer(layer).output.shape[-1])


@functools.cache
def symbolic_backbone(name: str):
    """The unpooled backbone's graph at its input size with no variable initialised: its layer
    names and shapes in a second or two, whatever its size."""
    import keras

    spec = get_backbone(name)
    if spec.weights_source == "savedmodel":
        raise ValueError(
            f"{name} is a SavedModel, whose inner layers are not reachable: LAYER and "
            "`make layers` do not apply to it."
        )
    size = spec.input_size
    fresh_names()
    with keras.StatelessScope(initialize_variables=False):
        return spec.build_fn()(
            include_top=False, weights=None, input_shape=(size, size, 3), pooling=None
        )


def fresh_names() -> None:
    """Restart Keras's automatic layer names (`activation_17`): the model `make layers` lists
    and the one extraction builds then number their unnamed layers alike, so such a name
    chosen from the list is found. Clears Keras's global state; call before building."""
    import keras

    keras.backend.clear_session()
