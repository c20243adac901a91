"""GAP features of one backbone, streamed from the memory-mapped arrays into an `.h5` file.

File layout (one per backbone and settings):
    train/features, train/features_flip (TTA=flip), train/ids, train/labels, train/zeroshot...
    test/...    the same without labels
    attrs: backbone, input_size, feature_dim, weights, weights_source, preprocess, precision,
           tta, fingerprint (of the image arrays), keras_version, keras_backend and its version,
           runtime (keras or litert: provenance only, litert's exports match Keras's);
           and layer, when the features pool an inner layer (LAYER) rather than the output.
The file is filled under a `.partial` name, batch by batch, and renamed when complete: an
interrupted run leaves no final file, and a re-run continues from the last batch written.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from dogscats import arrays, config, litert, messages, store
from dogscats.backbones import BackboneSpec, build_backbone, get_backbone, resolve_keras_weights
from dogscats.backbones import layers as backbone_layers
from dogscats.backbones.weights import check_keras_weights, weights_files
from dogscats.forward import Forward, check_devices, place, run_forward
from dogscats.store import SPLITS

# ImageNet-1k class ranges used by the zero-shot head: dogs 151-268, cats 281-285.
DOG_CLASSES = slice(151, 269)
CAT_CLASSES = slice(281, 286)
VERIFY_BLOCK_ROWS = 4096  # rows read at a time when a written file is checked


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


def arrays_manifest_of(path: str | os.PathLike) -> Path | None:
    """The manifest of the arrays a feature file was made from (make's prerequisite of its
    rule): the arrays of its input size in its data set's folder; None when the file records
    no input size (unreadable, or not written by `extract`)."""
    size = (stored_attrs(Path(path), ["input_size"]) or {}).get("input_size")
    if size is None:
        return None
    return config.arrays_dir_in(Path(path).parent, int(size)) / config.ARRAYS_MANIFEST


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
    devices: str = "auto",
    layer: str | None = None,
    runtime: str = "keras",
    workers: int | None = None,
    wait: bool = True,
    export_ahead: tuple[str, ...] = (),
) -> Path:
    """Write (or find up to date) the feature file of one backbone; return its path.
    `layer`: pool that layer's output instead of the backbone's last (checked first).
    `runtime`: keras (here), litert or auto (the CLI's and make's default; litert.py);
    `workers`: the interpreter's threads (default every core); `export_ahead`: backbones
    exported for LiteRT here when this extraction starts Keras (`export_ahead`).
    Another extraction into the same folder is waited for (`wait` False: BusyError)."""
    spec = get_backbone(backbone)
    _check_choice("TTA", tta, ("none", "flip"))
    _check_choice("PRECISION", precision, ("float32", "bfloat16"))
    _check_choice("RUNTIME", runtime, config.RUNTIMES)
    if layer:
        backbone_layers.layer_dim(spec.name, layer)  # a wrong name stops here, in seconds
    arrays_dir = Path(arrays_dir or config.arrays_dir(data_dir, spec.input_size))
    out = Path(
        out
        or config.feature_path(
            data_dir, backbone, weights=weights, precision=precision, tta=tta, layer=layer
        )
    )
    # One extraction at a time per features folder: two would write the same partial file.
    # The up-to-date check is inside: the run waited for may have just written `out`.
    with store.writer_lock(out.parent, "features", wait):
        return _extract(
            spec,
            out,
            arrays_dir,
            weights,
            weights_dir,
            tta,
            precision,
            batch_size,
            progress,
            devices,
            layer,
            runtime,
            workers,
            export_ahead,
        )


def _extract(
    spec,
    out,
    arrays_dir,
    weights,
    weights_dir,
    tta,
    precision,
    batch_size,
    progress,
    devices,
    layer,
    runtime,
    workers,
    ahead=(),
) -> Path:
    """`extract` under its lock: the up-to-date check, then the whole extraction."""
    manifest = arrays.read_manifest(arrays_dir)
    wanted = expected_attrs(spec, weights, precision, tta, manifest["fingerprint"], layer)
    if is_up_to_date(out, wanted):
        print(f"{out} is up to date.")
        return out
    if weights == "random":
        print(
            f"*** WEIGHTS=random: {spec.name} gets RANDOM weights; its features are for tests "
            "and dry runs only, not for a real submission. ***",
            flush=True,
        )
    elif weights == "imagenet" and spec.weights_source == "keras":
        resolve_keras_weights(spec, weights_dir)  # fail now, before any long work
    partial = store.partial_path(out)
    needed = _bytes_needed(manifest["counts"], spec.feature_dim, tta)
    _check_room(partial, needed)
    forward = build_forward(
        spec, weights, weights_dir, precision, batch_size, tta, devices, layer, runtime, workers
    )
    batch_size = forward.batch_size
    if forward.runtime == "litert" and "keras" in sys.modules:
        export_ahead(ahead, weights, weights_dir, layer)
    print(f"Forward pass: {forward.placement.describe()}, batch {batch_size}", flush=True)
    with _write_errors(partial, needed):
        with h5py.File(_open_partial(partial, wanted, forward.runtime), "a") as handle:
            for split in SPLITS:
                images, index = arrays.load_split(arrays_dir, split)
                check = arrays.row_check(arrays_dir, split, index)  # rows against their digests
                _extract_split(
                    handle, split, images, check, index, forward, batch_size, tta, progress
                )
            if not layer:  # the ImageNet classifier reads the last layer's features only
                _add_zeroshot(handle, spec, weights, tta)
    store.commit(partial, out, lambda path: verify_feature_file(path, wanted, manifest["counts"]))
    print(f"Wrote {out}", flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# Complete or absent: room checked first, write errors caught, the file verified before its name


def _bytes_needed(counts: dict[str, int], dim: int, tta: str) -> int:
    """The float32 features of every row (twice with TTA=flip), plus a margin for HDF5's own
    structures and the small datasets (ids, labels, zero-shot)."""
    views = 2 if tta == "flip" else 1
    rows = sum(counts.values())
    return rows * dim * 4 * views + rows * 64 + (1 << 20)


def _check_room(partial: Path, needed: int) -> None:
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    free = shutil.disk_usage(partial.parent).free
    if free < needed - have:
        raise OSError(
            f"no room for {partial}: the feature file needs about {_mb(needed - have)} more, "
            f"and {_mb(free)} are free on its disk. Free some space and re-run."
        )


def _mb(size: float) -> str:
    return f"{size / 1e6:,.0f} MB"


class FeatureWriteError(OSError):
    """Writing a feature file failed. HDF5 keeps the failed file open and crashes when Python
    closes it at exit, so the CLI ends the process right after reporting this."""

    exit_now = True


@contextmanager
def _write_errors(partial: Path, needed: int) -> Iterator[None]:
    """Turn a failed write into one line naming the file and the space it needs, and remove the
    partial file (it may hold rows that never reached the disk).

    HDF5 reports some write failures only while h5py frees an object, where Python prints
    "Exception ignored" and carries on; those are caught through sys.unraisablehook and count
    as failures too. An interruption (Ctrl-C) keeps the partial file: the next run resumes.
    """
    ignored: list[BaseException] = []
    previous = sys.unraisablehook, sys.excepthook
    sys.unraisablehook = lambda unraisable: ignored.append(unraisable.exc_value)
    # h5py's Cython __dealloc__ also prints the traceback itself through sys.excepthook
    # (PyErr_PrintEx) before the unraisable hook: recorded here too, so the user sees one line.
    sys.excepthook = lambda kind, value, traceback: ignored.append(value)
    try:
        yield
        failure = ignored[0] if ignored else None
    except (OSError, RuntimeError) as error:
        failure = error
    finally:
        sys.unraisablehook, sys.excepthook = previous
    if failure is None:
        return
    store.remove(partial)
    free = shutil.disk_usage(partial.parent).free if partial.parent.exists() else 0
    raise FeatureWriteError(
        f"writing {partial} failed ({_h5_reason(failure)}); the partial file was removed. The "
        f"feature file needs about {_mb(needed)} and {_mb(free)} are free on its disk: free "
        "some space (or raise `ulimit -f`) and re-run."
    ) from failure


def _h5_reason(error: BaseException) -> str:
    """The system's reason inside HDF5's long message, e.g. 'No space left on device'."""
    text = str(error)
    match = re.search(r"error message = '([^']+)'", text)
    return match.group(1) if match else messages.first_line(error)


def verify_feature_file(path: Path, wanted: dict[str, object], counts: dict[str, int]) -> None:
    """Read a written feature file back before it gets its final name: its settings, every
    split's row count, and every feature row finite and written (an all-zero row is one the
    disk never got). Reads in blocks, so memory stays flat. Raises DamagedFileError."""

    def damaged(why: str) -> store.DamagedFileError:
        return store.DamagedFileError(f"{path}: {why}; it was not kept. Re-run to rebuild it.")

    try:
        with h5py.File(path, "r") as handle:
            attrs = {name: _plain(handle.attrs.get(name)) for name in wanted}
            changed = store.changed_settings(attrs, wanted)
            if changed:
                raise damaged(f"settings differ from those asked for: {', '.join(changed)}")
            for split in SPLITS:
                _verify_split(handle, split, counts[split], damaged)
    except (OSError, KeyError, RuntimeError) as error:
        raise damaged(f"unreadable ({_h5_reason(error)})") from None


def _verify_split(handle, split: str, rows: int, damaged) -> None:
    group = handle[split]
    if int(group.attrs.get("rows_done", -1)) != rows or len(group["ids"]) != rows:
        raise damaged(f"{split} holds {group.attrs.get('rows_done')} of {rows} rows")
    for name in (n for n in ("features", "features_flip") if n in group):
        data = group[name]
        if data.shape[0] != rows:
            raise damaged(f"{split}/{name} has {data.shape[0]} rows, not {rows}")
        for first in range(0, rows, VERIFY_BLOCK_ROWS):
            block = data[first : first + VERIFY_BLOCK_ROWS]
            if not np.isfinite(block).all():
                raise damaged(f"{split}/{name} holds NaN or infinite values near row {first}")
            if (~block.any(axis=1)).any():
                row = first + int(np.flatnonzero(~block.any(axis=1))[0])
                raise damaged(f"{split}/{name} row {row} is all zeros (never written)")


def check_ready(
    backbones: list[str],
    weights: str = "imagenet",
    weights_dir: str | None = None,
    devices: str = "auto",
) -> None:
    """What extraction needs beyond the arrays, checked before they are built (make's arrays
    rule runs this first): DEVICES on this backend, and each keras.applications backbone's
    ImageNet weights on disk or downloadable. A typo in DEVICES or an offline machine then
    stops in seconds, not after minutes of preprocessing. Keras starts only when a count of
    devices or Keras weights are to be checked."""
    check_devices(devices)
    if weights != "imagenet":
        return
    for name in backbones:
        spec = get_backbone(name)
        if spec.weights_source == "keras":
            check_keras_weights(spec, weights_dir)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}. Received: {value!r}")


def build_forward(
    spec: BackboneSpec,
    weights: str,
    weights_dir: str | None,
    precision: str,
    batch_size: int,
    tta: str,
    devices: str = "auto",
    layer: str | None = None,
    runtime: str = "keras",
    workers: int | None = None,
) -> Forward | litert.LiteForward:
    """The forward pass `extract` runs (bench/ measures this same one): the model built on
    `devices`, a batch rounded up to split over them, the mirrored pass with flip; compiled by
    Keras, or exported to LiteRT as `runtime` says (litert.forward). A LiteRT export recorded
    for this network is opened without starting Keras (litert.recorded_forward)."""
    flip = tta == "flip"
    name = config.layer_stem(spec.name, layer)
    # Only LiteRT records: RUNTIME=keras skips naming the weights files (a keras.applications
    # file is hash-checked again each time it is named).
    source = export_source(spec, weights, weights_dir) if runtime != "keras" else None
    if source is not None:
        recorded = litert.recorded_forward(
            spec, name, source, batch_size, flip, runtime, precision, devices, workers
        )
        if recorded is not None:
            return recorded
    where = place(devices)
    with where.scope():
        model = build_model(spec, weights, weights_dir, precision, layer)
    batch_size = where.batch_size(batch_size)
    return litert.forward(
        model, spec, batch_size, flip, where, runtime, precision, workers, name, _say, source
    )


def export_source(spec: BackboneSpec, weights: str, weights_dir: str | None) -> litert.Source:
    return litert.Source(weights, weights_dir, weights_files(spec, weights, weights_dir))


def export_ahead(
    backbones: list[str], weights: str, weights_dir: str | None, layer: str | None
) -> None:
    """Export for LiteRT the other backbones of a run while Keras is started here, so that
    their own extractions open the records without starting it (make passes them)."""
    for name in backbones:
        try:
            _export_if_unrecorded(get_backbone(name), weights, weights_dir, layer)
        except Exception as error:  # not this extraction's failure: its own says it again
            _say(f"{name} was not exported ahead ({messages.first_line(error)})")


def _export_if_unrecorded(
    spec: BackboneSpec, weights: str, weights_dir: str | None, layer: str | None
) -> None:
    stem = config.layer_stem(spec.name, layer)
    source = export_source(spec, weights, weights_dir)
    if source.files is not None and litert.recorded_export(spec, stem, source) is None:
        model = build_model(spec, weights, weights_dir, "float32", layer)
        litert.export(model, spec, stem, _say, source)


def _say(line: str) -> None:
    print(line, flush=True)


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


def _open_partial(partial: Path, wanted: dict[str, object], runtime: str) -> Path:
    """Keep a partial file written with the same settings (resume); otherwise start afresh."""
    if partial.exists() and store.changed_settings(stored_attrs(partial, wanted), wanted):
        partial.unlink()
    partial.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(partial, "a") as handle:
        handle.attrs.update(wanted)
        handle.attrs.update(_versions())
        handle.attrs["runtime"] = runtime  # of the run that wrote the last rows
    return partial


def _versions() -> dict[str, str]:
    """What computed the file: Keras, its backend and the backend's version (provenance only:
    features agree across backends, so a file made by one serves them all)."""
    backend = litert.configured_backend()
    module = sys.modules.get(backend)  # not started by a LiteRT extraction: its installed version
    version = module.__version__ if module else litert.distribution_version(backend)
    return {
        "keras_version": litert.distribution_version("keras"),
        "keras_backend": backend,
        f"{backend}_version": str(version),  # torch's is a str subclass h5py refuses
    }


def _extract_split(
    handle, split, images, check, index, forward, batch_size, tta, progress
) -> None:
    n = len(images)
    group = handle.require_group(split)
    names = ["features"] + (["features_flip"] if tta == "flip" else [])
    dim = int(forward.output_shape[-1])
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
    run_forward(images, forward, batch_size, write, done, desc, progress=progress, check=check)


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
    """All datasets of one split of a feature file, plus its attrs under 'attrs'.

    A file that cannot be read whole (cut short, corrupt, rows that disagree) is set aside
    as `<name>.damaged` and refused with one line saying how to rebuild it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `make features` for it first.")
    try:
        with h5py.File(path, "r") as handle:
            group = handle[split]
            data = {name: group[name][...] for name in group}
            data["ids"] = data["ids"].astype(str)
            data["attrs"] = dict(handle.attrs)
        problem = _load_problem(data)
    except (OSError, KeyError, RuntimeError, ValueError) as error:
        problem = f"unreadable ({_h5_reason(error)})"
    if problem is not None:
        aside = store.set_aside(path)
        raise store.DamagedFileError(
            f"{path} is damaged: {split} {problem}. Moved it to {aside.name}; run make (or "
            "`make features`) again to rebuild it."
        )
    return data


def _load_problem(data: dict[str, np.ndarray]) -> str | None:
    rows = len(data["ids"])
    for name, values in data.items():
        if name == "attrs" or not isinstance(values, np.ndarray):
            continue
        if len(values) != rows:
            return f"{name} has {len(values)} rows and ids {rows}"
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"{name} holds NaN or infinite values"
    return None


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
    blocks: tuple[int, ...] | None = None  # widths of each backbone's columns, in order

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
        blocks=tuple(int(d["features"].shape[1]) for d in train),
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
