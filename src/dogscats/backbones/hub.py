"""KerasHub presets as backbones: `hub:<preset>` (e.g. `hub:dinov2_base`, a Kaggle or Hugging
Face handle) or `hub:<folder>` (a preset saved with `save_to_preset`, for offline use).

Everything about feeding the model comes from the preset's own image converter
(`image_converter.json`): the input size, and the scale and offset that map 0-255 RGB to the
model's range, applied by `rescale` as the feed's preprocessing. Images reach it already resized
to that size by `make preprocess`, like every backbone's. A preset without a converter is
refused rather than fed with guessed numbers. The backbone's output is pooled to one vector per
image (`layers.pooled`: the spatial mean of a feature map, the mean over all tokens of a
transformer, class and register tokens included).

KerasHub is an optional extra (`pip install '.[hub]'`); without it a hub name stops with that
line. The input size of a local Keras-format preset is read with the standard library, so that
make plans it without importing Keras; a named preset asks KerasHub (which downloads the
preset's small config files once into its cache).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from dogscats.backbones.layers import pooled
from dogscats.backbones.registry import BackboneSpec, did_you_mean

INSTALL = "pip install '.[hub]'"  # the extra that brings keras-hub (pyproject.toml)
CONVERTER_FILE = "image_converter.json"  # KerasHub's names for a preset's files
CONFIG_FILE = "config.json"


def keras_hub():
    """The keras_hub module, or one line saying how to install it."""
    try:
        import keras_hub
    except ImportError as error:
        raise ValueError(
            f"hub: backbones need KerasHub, which is not installed ({error}). Fix: {INSTALL} "
            "(or .venv/bin/pip install 'keras-hub>=0.32') in this project's environment."
        ) from None
    return keras_hub


# ----------------------------------------------------------------------------------------------
# Names, sizes, settings: the preset's own files


def _local_folder(preset: str) -> Path | None:
    """The preset's folder when `preset` is a path; None for a preset name or a handle."""
    if not preset:
        raise ValueError("hub: needs a preset, e.g. hub:dinov2_base or hub:/path/to/preset.")
    if "://" in preset:
        return None
    path = Path(preset).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ValueError(
                f"hub:{preset}: {path} has no {CONFIG_FILE}, so it is not a KerasHub preset "
                "folder. Fix: save one with backbone.save_to_preset(folder) and "
                "converter.save_to_preset(folder), or download a preset's files into it."
            )
        return path.resolve()
    if os.sep in preset or preset.startswith("."):
        raise ValueError(f"hub:{preset}: there is no preset folder at {path.resolve()}.")
    return None


def check(preset: str) -> None:
    """A cheap check that make can run: a folder must be a preset folder."""
    _local_folder(preset)


def _read_json(preset: str, name: str) -> dict | None:
    """One of the preset's JSON files (None when it has none); a named preset's through
    KerasHub's own download and cache."""
    folder = _local_folder(preset)
    if folder is not None:
        path = folder / name
    else:
        _check_known(preset)
        from keras_hub.src.utils import preset_utils

        try:
            path = Path(preset_utils.get_file(preset, name))
        except FileNotFoundError:
            return None
        except Exception as error:  # the download or handle failure: say what to do instead
            raise ValueError(
                f"hub:{preset}: KerasHub could not get its {name} ({type(error).__name__}: "
                f"{error}). Without network, download the preset on a machine with network "
                "(keras_hub.models.Backbone.from_preset(...).save_to_preset(folder), and the "
                "converter's too) and use hub:<that folder>."
            ) from None
    return json.loads(path.read_text()) if path.is_file() else None


def _check_known(preset: str) -> None:
    """A name that is not one of KerasHub's presets stops here, with the closest names."""
    known = keras_hub().models.Backbone.presets
    if "://" in preset or preset in known:
        return
    hint = did_you_mean(preset, known, count=3, cutoff=0.6)
    raise ValueError(
        f"hub:{preset}: KerasHub {keras_hub().__version__} has no preset of that name.{hint} "
        "Give a name from keras_hub.models.Backbone.presets, a kaggle:// or hf:// handle, or "
        f"a preset folder. Received: {preset!r}"
    )


@functools.cache
def image_settings(preset: str) -> tuple[int, Any, Any]:
    """(input size, scale, offset) from the preset's image converter."""
    config = _read_json(preset, CONFIG_FILE)
    if config is None:
        raise ValueError(f"hub:{preset} has no {CONFIG_FILE}: not a KerasHub preset.")
    if "registered_name" not in config:
        # A Hugging Face or timm checkpoint: KerasHub translates its converter settings.
        converter = keras_hub().layers.ImageConverter.from_preset(preset)
        size, scale, offset = converter.image_size, converter.scale, converter.offset
    else:
        converter = _read_json(preset, CONVERTER_FILE)
        if converter is None:
            raise ValueError(
                f"hub:{preset} has no {CONVERTER_FILE}, so its input size and scaling are "
                "unknown (they are not guessed). Fix: save the converter that belongs to the "
                "backbone into the preset, e.g. keras_hub.layers.ImageConverter.from_preset("
                "'<the original preset>').save_to_preset(folder)."
            )
        settings = converter["config"]
        size = settings.get("image_size")
        scale, offset = settings.get("scale"), settings.get("offset")
        if size is None:  # a converter that does not resize: the backbone's fixed shape
            size = (config["config"].get("image_shape") or (None,))[:2]
    if not size or size[0] is None or len(set(size)) != 1:
        raise ValueError(
            f"hub:{preset}: its converter's image size is {size}; this pipeline feeds square "
            "images of one fixed size."
        )
    return int(size[0]), scale, offset


def input_size(preset: str) -> int:
    return image_settings(preset)[0]


def rescale(x, scale=None, offset=None):
    """x * scale + offset, per channel where they are lists: KerasHub's ImageConverter without
    its resizing (the arrays are already at the converter's size)."""
    import numpy as np

    if scale is not None:
        x = x * np.asarray(scale, dtype="float32")
    if offset is not None:
        x = x + np.asarray(offset, dtype="float32")
    return x


# ----------------------------------------------------------------------------------------------
# The spec and the builder


def _where(preset: str) -> str:
    """What KerasHub loads: the folder's absolute path, else the name or handle."""
    folder = _local_folder(preset)
    return str(folder) if folder is not None else preset


@functools.cache
def spec(name: str, preset: str) -> BackboneSpec:
    """The registry entry of a preset: its converter's size and scaling, its pooled dim."""
    size, scale, offset = image_settings(preset)
    where = _where(preset)
    model = _symbolic(where, size)
    return BackboneSpec(
        name=name,
        input_size=size,
        feature_dim=int(model.output_shape[-1]),
        builder="dogscats.backbones.hub:build",
        builder_kwargs=(("preset", where),),
        preprocess=f"dogscats.backbones.hub:rescale scale={scale} offset={offset}",
        preprocess_at="dogscats.backbones.hub:rescale",
        preprocess_kwargs=(("scale", _hashable(scale)), ("offset", _hashable(offset))),
        weights_source="keras_hub",
        min_size=size,
    )


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def _symbolic(where: str, size: int):
    import keras

    with keras.StatelessScope(initialize_variables=False):
        return build(where, weights=None, input_shape=(size, size, 3))


def _load_backbone(preset: str, load_weights: bool, input_shape: tuple | None):
    hub = keras_hub()
    from keras_hub.src.utils.preset_utils import get_preset_loader

    loader = get_preset_loader(preset)
    kwargs = {}
    config = loader.config.get("config", {})
    if input_shape is not None and "image_shape" in config:
        kwargs["image_shape"] = tuple(input_shape)  # ViT-style models resize their positions
    backbone = hub.models.Backbone.from_preset(preset, load_weights=load_weights, **kwargs)
    images = [x for x in backbone.inputs if len(x.shape) == 4 and x.shape[-1] == 3]
    if len(backbone.inputs) != 1 or not images:
        inputs = ", ".join(f"{x.name} {tuple(x.shape)}" for x in backbone.inputs)
        raise ValueError(
            f"hub:{preset} is a {type(backbone).__name__} taking {inputs}: only backbones with "
            "one (batch, height, width, 3) image input give image features."
        )
    return backbone


def build(
    preset: str,
    include_top: bool = False,
    weights: str | None = "imagenet",
    input_shape: tuple | None = None,
    pooling: str | None = "avg",
):
    """The keras.applications signature over a KerasHub preset: `weights` "imagenet" (any
    non-None value) loads the preset's weights, None leaves them random; `pooling="avg"`
    pools the output to (batch, dim), None returns the backbone itself."""
    import keras

    if include_top:
        raise ValueError(f"hub:{preset}: a KerasHub backbone has no classifier top here.")
    if weights not in (None, "imagenet"):
        raise ValueError(
            f"hub:{preset} takes its weights from the preset. Received: weights={weights!r}"
        )
    backbone = _load_backbone(preset, weights is not None, input_shape)
    if pooling is None:
        return backbone
    return keras.Model(backbone.inputs[0], pooled(backbone.outputs[0]), name=backbone.name)
