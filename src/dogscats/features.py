"""GAP features of one backbone, streamed from the memory-mapped arrays into an `.h5` file.

File layout (one per backbone and settings):
    train/features, train/features_flip (TTA=flip), train/ids, train/labels, train/zeroshot...
    test/...    the same without labels
    attrs: backbone, input_size, feature_dim, weights, weights_source, preprocess, precision,
           tta, fingerprint (of the image arrays), keras/tensorflow versions; and layer, when
           the features pool an inner layer (LAYER) rather than the backbone's output.
The file is filled under a `.partial` name, batch by batch, and renamed when complete: an
interrupted run leaves no final file, and a re-run continues from the last batch written.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from dogscats import arrays, config, store
from dogscats.backbones import BackboneSpec, build_backbone, get_backbone, resolve_keras_weights
from dogscats.backbones import layers as backbone_layers
from dogscats.store import SPLITS

# ImageNet-1k class ranges used by the zero-shot head: dogs 151-268, cats 281-285.
DOG_CLASSES = slice(151, 269)
CAT_CLASSES = slice(281, 286)


def expected_attrs(
    spec: BackboneSpec,
    weights: str,
    precision: str,
    tta: str,
    fingerprint: str,
    layer: str | None = None,
) -> dict[str, object]:
    """The attributes that identify a feature file; a file whose attrs differ is not reused.
    `layer` (and its dim) only when set, so files of the backbone's output keep their attrs."""
    layered = {"layer": layer} if layer else {}
    return {
        "backbone": spec.name,
        "input_size": spec.input_size,
        "feature_dim": backbone_layers.layer_dim(spec.name, layer) if layer else spec.feature_dim,
        **layered,
        "weights": weights,
        "weights_source": "random" if weights == "random" else spec.weights_source,
        "preprocess": spec.preprocess,
        "precision": precision,
        "tta": tta,
        "fingerprint": fingerprint,
    }


def stored_attrs(path: Path, names) -> dict[str, object] | None:
    """The named attributes of a feature file (partial or final) as plain Python values, or
    None when it is missing or cut short before its header was written."""
    try:
        with h5py.File(path, "r") as handle:
            return {name: _plain(handle.attrs.get(name)) for name in names}
    except OSError:
        return None


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def is_up_to_date(path: Path, wanted: dict[str, object]) -> bool:
    """A complete feature file made with these settings (its attributes say which)."""
    return path.is_file() and not store.changed_settings(stored_attrs(path, wanted), wanted)


def extract(
    data_dir: str | os.PathLike,
    backbone: str,
    weights: str = "imagenet",
    weights_dir: str | None = None,
    tta: str = "none",
    precision: str = "float32",
    batch_size: int = 32,
    arrays_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    layer: str | None = None,
) -> Path:
    """Write (or find up to date) the feature file of one backbone; return its path.
    `layer`: pool that layer's output instead of the backbone's last (checked first)."""
    spec = get_backbone(backbone)
    _check_choice("TTA", tta, ("none", "flip"))
    _check_choice("PRECISION", precision, ("float32", "bfloat16"))
    if layer:
        backbone_layers.layer_dim(spec.name, layer)  # a wrong name stops here, in seconds
    arrays_dir = Path(arrays_dir or config.arrays_dir(data_dir, spec.input_size))
    out = Path(
        out
        or config.feature_path(
            data_dir, backbone, weights=weights, precision=precision, tta=tta, layer=layer
        )
    )
    manifest = arrays.read_manifest(arrays_dir)
    wanted = expected_attrs(spec, weights, precision, tta, manifest["fingerprint"], layer)
    if is_up_to_date(out, wanted):
        print(f"{out} is up to date.")
        return out
    if weights == "random":
        print(
            f"*** WEIGHTS=random: {backbone} gets RANDOM weights; its features are for tests "
            "and dry runs only, not for a real submission. ***",
            flush=True,
        )
    elif weights == "imagenet" and spec.weights_source == "keras":
        resolve_keras_weights(spec, weights_dir)  # fail now, before any long work
    model = build_model(spec, weights, weights_dir, precision, layer)
    forward = make_forward(model, spec, batch_size, flip=(tta == "flip"))
    partial = store.partial_path(out)
    with h5py.File(_open_partial(partial, wanted), "a") as handle:
        for split in SPLITS:
            images, index = arrays.load_split(arrays_dir, split)
            _extract_split(handle, split, images, index, forward, batch_size, tta, progress)
        if not layer:  # the ImageNet classifier reads the last layer's features only
            _add_zeroshot(handle, spec, weights, tta)
    os.replace(partial, out)
    print(f"Wrote {out}", flush=True)
    return out


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}. Received: {value!r}")


def build_model(
    spec: BackboneSpec,
    weights: str,
    weights_dir: str | None,
    precision: str,
    layer: str | None = None,
):
    """The backbone as `extract` builds it: the given weights, computed in `precision`, its
    output pooled (or `layer`'s output pooled, when given) to (batch, dim)."""
    import keras

    if layer:
        backbone_layers.layer_dim(spec.name, layer)  # checked on the graph before any weights
        backbone_layers.fresh_names()  # unnamed layers numbered as `make layers` lists them
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if precision == "bfloat16" else "float32"
    )
    try:
        if not layer:
            return build_backbone(spec.name, weights=weights, weights_dir=weights_dir)
        whole = build_backbone(spec.name, weights=weights, weights_dir=weights_dir, pooling=None)
        return backbone_layers.pooled_at(whole, layer)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def make_forward(model, spec: BackboneSpec, batch_size: int, flip: bool):
    """A tf.function over uint8 batches of one fixed shape: preprocess, model, optional mirror.

    A fixed input signature avoids retracing, which made it faster than eager calls on CPU;
    XLA compilation was slower on CPU, so it stays off (bench/REPORT.md has the figures).
    """
    import tensorflow as tf

    preprocess = spec.preprocess_fn()
    size = spec.input_size
    signature = [tf.TensorSpec((batch_size, size, size, 3), tf.uint8)]

    @tf.function(input_signature=signature)
    def forward(batch):
        x = preprocess(tf.cast(batch, tf.float32))
        outputs = [tf.cast(model(x, training=False), tf.float32)]
        if flip:
            outputs.append(tf.cast(model(tf.reverse(x, axis=[2]), training=False), tf.float32))
        return outputs

    return forward


def batch_stream(images: np.ndarray, batch_size: int, start: int = 0):
    """tf.data pipeline of fixed-size uint8 batches read from the memory map, prefetched.

    The last batch is zero-padded so that one compiled graph serves every batch.
    """
    import tensorflow as tf

    size = images.shape[1]

    def batches() -> Iterator[np.ndarray]:
        read = _RowReader(images)
        try:
            for first in range(start, len(images), batch_size):
                rows = min(batch_size, len(images) - first)
                batch = np.empty((batch_size, *images.shape[1:]), images.dtype)
                read(first, batch[:rows])
                batch[rows:] = 0
                yield batch
        finally:
            read.close()

    spec = tf.TensorSpec((batch_size, size, size, 3), tf.uint8)
    # A fixed prefetch with autotuning off: one generator ahead of the model needs no tuning,
    # and with it on, deleting a finished iterator at times waited seconds for the autotuner
    # (seen in make bench, traced to the iterator's teardown).
    options = tf.data.Options()
    options.autotune.enabled = False
    dataset = tf.data.Dataset.from_generator(batches, output_signature=spec)
    return dataset.prefetch(2).with_options(options)


class _RowReader:
    """read(first, out) fills `out` with rows first.. of `images`.

    A whole .npy memory map is read with os.preadv rather than through the map: every page
    touched through a map stays in this process's resident memory until the map is closed,
    so peak RSS grew with the data set (make bench's memory section watches this).
    Anything else (an in-RAM array, a slice of a map) is copied as before.
    """

    def __init__(self, images: np.ndarray):
        self.images, self.fd = images, None
        whole_map = isinstance(images, np.memmap) and isinstance(images.base, mmap.mmap)
        if whole_map and images.filename and images.flags.c_contiguous:
            self.fd = os.open(images.filename, os.O_RDONLY)

    def __call__(self, first: int, out: np.ndarray) -> None:
        if self.fd is None:
            out[...] = self.images[first : first + len(out)]
            return
        view = memoryview(out).cast("B")
        position = self.images.offset + first * self.images.strides[0]
        while view:
            read = os.preadv(self.fd, [view], position)
            if read == 0:
                raise EOFError(f"{self.images.filename} ends before row {first + len(out)}")
            view, position = view[read:], position + read

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _open_partial(partial: Path, wanted: dict[str, object]) -> Path:
    """Keep a partial file written with the same settings (resume); otherwise start afresh."""
    if partial.exists() and store.changed_settings(stored_attrs(partial, wanted), wanted):
        partial.unlink()
    partial.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(partial, "a") as handle:
        handle.attrs.update(wanted)
        handle.attrs["keras_version"], handle.attrs["tensorflow_version"] = _versions()
    return partial


def _versions() -> tuple[str, str]:
    import keras
    import tensorflow as tf

    return keras.__version__, tf.__version__


def _extract_split(handle, split, images, index, forward, batch_size, tta, progress) -> None:
    n = len(images)
    group = handle.require_group(split)
    names = ["features"] + (["features_flip"] if tta == "flip" else [])
    dim = int(forward.get_concrete_function().structured_outputs[0].shape[-1])
    for name in names:
        group.require_dataset(name, shape=(n, dim), dtype="float32")
    if "ids" not in group:
        group.create_dataset("ids", data=index["id"].astype(str).to_numpy().astype("S"))
        group.create_dataset("labels", data=index["label"].to_numpy().astype("int8"))

    def write(first: int, outputs: list[np.ndarray]) -> None:
        for name, output in zip(names, outputs):
            group[name][first : first + len(output)] = output
        group.attrs["rows_done"] = first + len(outputs[0])  # flushed with the rows it counts
        handle.flush()

    done = int(group.attrs.get("rows_done", 0))
    desc = f"{handle.attrs['backbone']} {split}"
    run_forward(images, forward, batch_size, write, start=done, desc=desc, progress=progress)


def run_forward(
    images: np.ndarray,
    forward,
    batch_size: int,
    write: Callable[[int, list[np.ndarray]], None],
    start: int = 0,
    desc: str = "",
    progress: bool = True,
) -> None:
    """The resumable loop of every stage that runs a network over the arrays (features, the
    fine-tuning cache): `forward` on rows start.. in fixed-size batches, then
    `write(first_row, outputs)` with the padding cut off; `write` records its own resume point.
    """
    bar = tqdm(total=len(images), initial=start, desc=desc, unit="img", disable=not progress)
    done = start
    for batch in batch_stream(images, batch_size, start=start):
        rows = min(batch_size, len(images) - done)
        write(done, [np.asarray(output)[:rows] for output in forward(batch)])
        done += rows
        bar.update(rows)
    bar.close()


def _add_zeroshot(handle, spec: BackboneSpec, weights: str, tta: str) -> None:
    """P(dog) from the backbone's own ImageNet classifier applied to the stored GAP features."""
    classifier = spec.imagenet_classifier() if weights == "imagenet" else None
    if classifier is None:
        return
    kernel, bias = classifier
    for split in SPLITS:
        group = handle[split]
        for name in ("features", "features_flip"):
            if name in group:
                target = name.replace("features", "zeroshot")
                if target in group:
                    del group[target]
                group[target] = zeroshot_dog_probability(group[name][...] @ kernel + bias)


def zeroshot_dog_probability(logits: np.ndarray) -> np.ndarray:
    """Softmax mass on the dog classes over the mass on dog + cat classes."""
    logits = logits - logits.max(axis=1, keepdims=True)
    mass = np.exp(logits)
    dog = mass[:, DOG_CLASSES].sum(axis=1)
    cat = mass[:, CAT_CLASSES].sum(axis=1)
    return (dog / (dog + cat)).astype("float32")


def load_features(path: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
    """All datasets of one split of a feature file, plus its attrs under 'attrs'."""
    with h5py.File(path, "r") as handle:
        group = handle[split]
        data = {name: group[name][...] for name in group}
        data["ids"] = data["ids"].astype(str)
        data["attrs"] = dict(handle.attrs)
    return data


# ----------------------------------------------------------------------------------------------
# Feature sets: several backbones' files, concatenated for a head


@dataclass
class FeatureSet:
    """Concatenated features of several backbones, aligned by id."""

    train: np.ndarray
    test: np.ndarray
    y: np.ndarray
    train_ids: np.ndarray
    test_ids: np.ndarray
    train_flip: np.ndarray | None = None
    test_flip: np.ndarray | None = None
    train_zeroshot: np.ndarray | None = None
    test_zeroshot: np.ndarray | None = None

    def for_head(self, columns: str) -> FeatureSet:
        """What a head reads (`heads.*.input`): the features, or the zero-shot P(dog) column
        (already averaged over the mirrored images under TTA=flip)."""
        if columns == "features":
            return self
        if self.train_zeroshot is None:
            raise ValueError(
                "HEAD=zeroshot needs a backbone whose ImageNet classifier ships with "
                "its weights (BACKBONES=offline) and WEIGHTS=imagenet."
            )
        return FeatureSet(
            train=self.train_zeroshot[:, None],
            test=self.test_zeroshot[:, None],
            y=self.y,
            train_ids=self.train_ids,
            test_ids=self.test_ids,
        )


class FeatureMismatchError(ValueError):
    pass


def load_feature_set(paths: list[str | os.PathLike], tta: str = "none") -> FeatureSet:
    """Load and concatenate feature files; their ids and labels must be identical."""
    if not paths:
        raise ValueError("No feature files given.")
    parts = {split: [load_features(p, split) for p in paths] for split in ("train", "test")}
    for split, loaded in parts.items():
        _check_aligned(paths, loaded, split)
    flip = tta == "flip"
    if flip:
        missing = [str(p) for p, d in zip(paths, parts["train"]) if "features_flip" not in d]
        if missing:
            raise FeatureMismatchError(
                f"TTA=flip needs mirrored features, missing in: {', '.join(missing)}. "
                "Run `make features TTA=flip`."
            )
    train, test = parts["train"], parts["test"]
    return FeatureSet(
        train=_concat(train, "features"),
        test=_concat(test, "features"),
        y=train[0]["labels"].astype(int),
        train_ids=train[0]["ids"],
        test_ids=test[0]["ids"],
        train_flip=_concat(train, "features_flip") if flip else None,
        test_flip=_concat(test, "features_flip") if flip else None,
        train_zeroshot=_zeroshot(train, flip),
        test_zeroshot=_zeroshot(test, flip),
    )


def _check_aligned(paths, loaded: list[dict], split: str) -> None:
    first = loaded[0]
    for path, data in zip(paths[1:], loaded[1:]):
        same_ids = np.array_equal(first["ids"], data["ids"])
        same_labels = np.array_equal(first["labels"], data["labels"])
        if not (same_ids and same_labels):
            what = "ids" if not same_ids else "labels"
            raise FeatureMismatchError(
                f"The {split} {what} of {path} differ from those of {paths[0]}: the feature "
                "files were made from different images. Re-run `make features` for both."
            )


def _concat(loaded: list[dict], name: str) -> np.ndarray:
    return np.concatenate([d[name] for d in loaded], axis=1).astype("float32")


def _zeroshot(loaded: list[dict], flip: bool) -> np.ndarray | None:
    """Mean zero-shot P(dog) over the backbones that ship an ImageNet classifier."""
    names = ["zeroshot"] + (["zeroshot_flip"] if flip else [])
    columns = [d[n] for d in loaded for n in names if n in d]
    return np.mean(columns, axis=0) if columns else None
