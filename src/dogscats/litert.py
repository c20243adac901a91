"""The forward pass through LiteRT (TFLite with XNNPACK) on a CPU, beside Keras's own.

RUNTIME (make, CLI) picks it: `keras` runs the compiled Keras step (forward.make_forward);
`litert` exports the network (preprocessing and pooling included) once per backbone, input
size, weights and layer into $KERAS_HOME/litert/ and runs the export with `ai-edge-litert`'s
interpreter; `auto` takes `litert` on a CPU under TensorFlow in float32 and falls back to
`keras`, in one line, for a network that fails to export or to match. Under JAX or PyTorch
`auto` is `keras` without a line: the export goes through TensorFlow's converter, and loading
TensorFlow beside another backend costs seconds and memory for every run.

An export is kept only when its outputs on a fixed batch equal Keras's within MATCH_TOLERANCE
(store.atomic_save's check): a cache file that exists has matched, which is why features
from either runtime share one file name. A record beside it (what built it, its digest) lets
the next extraction open it without starting Keras or TensorFlow. README ('Runtimes') has the
measured speeds.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dogscats import config, messages, store
from dogscats.backbones import BackboneSpec
from dogscats.backbones.weights import keras_home
from dogscats.forward import Placement, make_forward

EXPORT_FORMAT = 2  # bump when what an export holds changes: older files are then not reused
MATCH_TOLERANCE = 1e-4  # max abs difference from Keras's outputs on the check batch
CHECK_ROWS = 4  # images in the check batch
# Images per interpreter call: a batch is run this many rows at a time. XNNPACK ran EfficientNet-
# Lite2 at 330 about 2.5x faster per image on 1-4 rows than on 32 (a whole batch's activations
# leave the CPU's caches); README, 'Runtimes'.
INVOKE_ROWS = 2


class RuntimeChoiceError(ValueError):
    """RUNTIME=litert where it cannot run, or an export refused: one line for the user."""


def cache_dir() -> Path:
    """Where the exports live: beside the weights Keras caches, shared by every data set."""
    return keras_home() / "litert"


def wanted(runtime: str, where: Placement, precision: str) -> bool:
    """Whether to try LiteRT: always for `litert` (after checking it can run), for `auto`
    only on a CPU under TensorFlow in float32."""
    if runtime not in config.RUNTIMES:
        raise RuntimeChoiceError(
            f"RUNTIME must be one of {', '.join(config.RUNTIMES)}. Received: {runtime!r}"
        )
    if runtime == "keras":
        return False
    possible = where.backend == "tensorflow" and precision == "float32"
    if runtime == "litert" and not possible:
        raise RuntimeChoiceError(
            f"RUNTIME=litert runs float32 exports made through TensorFlow; here the backend is "
            f"{where.backend} and PRECISION={precision}. Use KERAS_BACKEND=tensorflow with "
            "PRECISION=float32, or RUNTIME=keras."
        )
    on_cpu = all(device.startswith("cpu") for device in where.devices)
    return possible and (runtime == "litert" or on_cpu)


def forward(
    model,
    spec: BackboneSpec,
    batch_size: int,
    flip: bool,
    where: Placement,
    runtime: str = "auto",
    precision: str = "float32",
    workers: int | None = None,
    name: str = "",
    log=print,
    source: Source | None = None,
):
    """The forward pass `runtime` asks for: a LiteForward, or forward.make_forward's step.
    `name` (default the backbone's) names the export; under `auto`, a network that does not
    export or match falls back to Keras with one line. `source`: what the network is built
    from, recorded beside the export (`recorded_forward` finds it next time without Keras)."""
    if wanted(runtime, where, precision):
        try:
            path = export(model, spec, name or config.backbone_stem(spec.name), log, source)
            return LiteForward(path, spec, batch_size, flip, threads(workers))
        except RuntimeChoiceError as error:
            if runtime == "litert":
                raise
            log(f"RUNTIME=auto: {error} Running Keras instead.")
    return make_forward(model, spec, batch_size, flip, where)


def threads(workers: int | None) -> int:
    """Every core the user gives (WORKERS), else every core of the machine."""
    return int(workers) if workers else os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------
# The export and its cache


def export_path(model, spec: BackboneSpec, name: str) -> Path:
    """The cache file of one network: its name, input size and a key of everything that
    changes its outputs (the weights' values themselves, so any new weights file or seed
    gets its own export)."""
    import keras

    key = store.digest(
        EXPORT_FORMAT,
        name,
        spec.input_size,
        spec.preprocess,
        _weights_digest(model),
        keras.__version__,
        distribution_version("ai-edge-litert"),
    )
    return cache_dir() / f"{_safe(name)}-{spec.input_size}-{key[:16]}.tflite"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)


def export(model, spec: BackboneSpec, name: str, log=print, source: Source | None = None) -> Path:
    """The checked export of `model` (with spec's preprocessing) from the cache, made first if
    need be. A cache file that no longer loads or matches is set aside and rebuilt. Raises
    RuntimeChoiceError when the export fails or its outputs differ from Keras's. With
    `source`, the checked file is recorded under what it was built from (`record`)."""
    path = export_path(model, spec, name)
    network = _with_preprocess(model, spec)
    batch = check_batch(spec.input_size)
    # Every data set shares the cache: two terminals exporting one network would write one
    # partial file, so exports take turns (the second then finds the first's file).
    with store.writer_lock(path.parent, "litert", log=log):
        if path.is_file():
            # Checked again on every use (a second or so): a file changed behind the tool's back
            # may still load, and only its outputs tell.
            try:
                _check(path, network, batch)
                return record(path, spec, name, source)
            except (ValueError, RuntimeError) as error:
                aside = store.set_aside(path)
                why = messages.first_line(error)
                log(f"{path} is damaged ({why}): moved to {aside.name}, rebuilding it")
        log(f"Exporting {name} @{spec.input_size} for LiteRT into {path}")
        try:
            store.atomic_save(
                path, lambda p: _save(network, p), lambda p: _check(p, network, batch)
            )
        except RuntimeChoiceError:
            raise
        except Exception as error:  # the converter raises many kinds; each is one line here
            why = f"{type(error).__name__}: {messages.first_line(error)}"
            raise RuntimeChoiceError(f"{name} did not export to LiteRT ({why}).") from None
        return record(path, spec, name, source)


def check_batch(size: int) -> np.ndarray:
    """The fixed batch the match check runs: seeded noise over the whole uint8 range."""
    rng = np.random.default_rng(config.SEED)
    return rng.integers(0, 256, (CHECK_ROWS, size, size, 3), dtype=np.uint8)


def _with_preprocess(model, spec: BackboneSpec):
    """float32 images in 0..255 -> the model's outputs: the preprocessing goes into the
    export, so the interpreter reads the arrays as they are."""
    import keras

    inputs = keras.Input((spec.input_size, spec.input_size, 3), dtype="float32")
    outputs = model(spec.preprocess_fn()(inputs), training=False)
    return keras.Model(inputs, keras.ops.cast(outputs, "float32"))


def _save(network, path: Path) -> None:
    """The network as a LiteRT flatbuffer, through TensorFlow's converter from its frozen graph.

    Not `network.export(format="litert")`: Keras writes a SavedModel to a temporary folder and
    the converter reads it back, 5-6 s of its 6-8 s for an EfficientNet-Lite (README,
    'Runtimes'). Freezing the traced function (the variables as constants, as the converter
    would do with a SavedModel's) gives the same flatbuffer ops and outputs in 1-2 s.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    shape = (None, *network.input_shape[1:])
    serve = tf.function(
        lambda images: network(images, training=False),
        input_signature=[tf.TensorSpec(shape, tf.float32)],
        autograph=False,  # a plain call: nothing for autograph to convert
    )
    frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    path.write_bytes(converter.convert())


def _check(path: Path, network, batch: np.ndarray) -> None:
    """Refuse an export whose outputs differ from Keras's by more than MATCH_TOLERANCE."""
    expected = np.asarray(network.predict_on_batch(batch.astype(np.float32)), np.float32)
    got = _Runner(path, len(batch), 1).run(batch.astype(np.float32))
    worst = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else np.inf
    if not worst <= MATCH_TOLERANCE:
        raise RuntimeChoiceError(
            f"the LiteRT export differs from Keras by {worst:.2e} (allowed {MATCH_TOLERANCE:g})."
        )


def _weights_digest(model) -> str:
    import keras

    values = (keras.ops.convert_to_numpy(w.value).tobytes() for w in model.weights)
    return store.digest(*values)


# ----------------------------------------------------------------------------------------------
# Found again without Keras: a record of what each export was built from
#
# Starting TensorFlow and Keras, building the network and re-checking its export take 5-7 s of
# each extraction (README, 'Runtimes'). A checked export is therefore recorded under a key of
# what builds it (the spec, the weights setting and the stat of each weights file, the backbone
# code, the versions), with its own digest: the next extraction of that network opens the file
# from the record alone, and anything changed since (a weights file, the export's bytes, the
# code) sends it back through Keras, which checks and records again.

RECORD_FORMAT = 1
# Where a GPU would show on Linux: NVIDIA's driver, WSL's GPU bridge, AMD's ROCm. With any of
# them (or off Linux), `auto` asks the backend instead, as `wanted` does.
GPU_DEVICE_NODES = ("/dev/nvidia0", "/dev/dxg", "/dev/kfd")


@dataclass(frozen=True)
class Source:
    """What a network is built from: its weights setting and the files they are read from
    (backbones.weights_files; None where they are not known before building, never recorded)."""

    weights: str
    weights_dir: str | None
    files: tuple[Path, ...] | None


def record(path: Path, spec: BackboneSpec, name: str, source: Source | None) -> Path:
    """Record the checked export `path` under `source` (when its files are known); returns
    `path`. Called under the cache's writer lock."""
    if source is not None and source.files is not None:
        entry = {"export": path.name, "digest": config.file_digest(path)}
        store.write_json(_record_path(spec, name, source), {**entry, "files": _stats(source)})
    return path


def recorded_export(spec: BackboneSpec, name: str, source: Source) -> Path | None:
    """The export recorded under `source`, when its bytes and every weights file are as they
    were when it was checked against Keras; else None."""
    if source.files is None:
        return None
    entry = store.read_json(_record_path(spec, name, source)) or {}
    path = cache_dir() / str(entry.get("export"))
    if entry.get("files") != _stats(source) or not path.is_file():
        return None
    return path if config.file_digest(path) == entry.get("digest") else None


def recorded_forward(
    spec: BackboneSpec,
    name: str,
    source: Source,
    batch_size: int,
    flip: bool,
    runtime: str,
    precision: str,
    devices: str,
    workers: int | None = None,
) -> LiteForward | None:
    """The LiteForward of a recorded export, opened without starting Keras or TensorFlow, where
    `runtime` surely asks for LiteRT (`wanted_without_keras`); else None (build and export)."""
    if not wanted_without_keras(runtime, precision, devices):
        return None
    path = recorded_export(spec, name, source)
    return LiteForward(path, spec, batch_size, flip, threads(workers)) if path else None


def wanted_without_keras(runtime: str, precision: str, devices: str) -> bool:
    """`wanted`'s yes where it is certain without starting the backend: float32 under
    TensorFlow, and RUNTIME=litert, DEVICES=cpu, or DEVICES=auto on a Linux machine with no
    GPU device node. Anything else (a GPU may be there) is left to `wanted`."""
    if runtime not in ("auto", "litert") or precision != "float32":
        return False
    if configured_backend() != "tensorflow":
        return False
    try:
        chosen = config.parse_devices(devices)
    except ValueError:  # forward.place names the mistake
        return False
    if runtime == "litert" or chosen == "cpu":
        return True
    return chosen == "auto" and not may_have_gpu()


def may_have_gpu() -> bool:
    return sys.platform != "linux" or any(os.path.exists(node) for node in GPU_DEVICE_NODES)


def configured_backend() -> str:
    """The backend Keras starts with, read as Keras reads it (KERAS_BACKEND, else keras.json in
    its home, else tensorflow) without starting it."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen:
        return chosen
    settings = store.read_json(keras_home() / "keras.json") or {}
    return str(settings.get("backend", "tensorflow"))


def _record_path(spec: BackboneSpec, name: str, source: Source) -> Path:
    key = store.digest(
        EXPORT_FORMAT,
        RECORD_FORMAT,
        name,
        repr(spec),
        source.weights,
        source.weights_dir or "",
        _code_digest(spec),
        *(distribution_version(d) for d in ("keras", "tensorflow", "ai-edge-litert")),
    )
    return cache_dir() / f"{_safe(name)}-{spec.input_size}-{key[:16]}.record.json"


def _stats(source: Source) -> list[list]:
    """(path, size, mtime) of each weights file; a missing file is recorded as such."""
    stats = []
    for file in source.files or ():
        try:
            found = Path(file).stat()
            stats.append([str(file), found.st_size, found.st_mtime_ns])
        except OSError:
            stats.append([str(file), None, None])
    return stats


def _code_digest(spec: BackboneSpec) -> str:
    """The source of the backbone package and of the module holding spec's builder: a change
    to how a network is built makes its records stale."""
    files = sorted(Path(__file__).parent.joinpath("backbones").glob("*.py"))
    try:
        found = importlib.util.find_spec(spec.builder.split(":")[0])
    except (ImportError, ValueError):  # a builder that cannot be found fails in the build
        found = None
    if found is not None and found.origin:
        files.append(Path(found.origin))
    return store.digest(*(file.read_bytes() for file in files))


def distribution_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


# ----------------------------------------------------------------------------------------------
# The interpreter as a forward pass


def _interpreter(path: Path, batch_size: int, threads: int):
    """An interpreter of `path` sized for batches of `batch_size`; raises on a file that
    does not load (ValueError from the flatbuffer check, RuntimeError from allocation)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise RuntimeChoiceError(
            "ai-edge-litert is not installed: run `make setup`, or use RUNTIME=keras."
        ) from None
    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    entry = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(entry["index"], [batch_size, *entry["shape"][1:]])
    interpreter.allocate_tensors()
    return interpreter


class _Runner:
    """An interpreter that runs float32 batches of `batch_size` images INVOKE_ROWS at a time
    (fewer when they do not divide the batch), into one output array."""

    def __init__(self, path: Path, batch_size: int, threads: int):
        self.batch_size, self.rows = batch_size, math.gcd(batch_size, INVOKE_ROWS)
        self.interpreter = _interpreter(path, self.rows, threads)
        self._input = self.interpreter.get_input_details()[0]["index"]
        output = self.interpreter.get_output_details()[0]
        self._output, self.output_shape = (
            output["index"],
            tuple(int(d) for d in output["shape"][1:]),
        )

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = np.empty((len(batch), *self.output_shape), np.float32)
        for first in range(0, len(batch), self.rows):
            self.interpreter.set_tensor(self._input, batch[first : first + self.rows])
            self.interpreter.invoke()
            out[first : first + self.rows] = self.interpreter.get_tensor(self._output)
        return out


@dataclass
class _CpuThreads:
    """A Placement's describe() for the interpreter (what extract prints)."""

    threads: int

    def describe(self) -> str:
        return f"LiteRT (XNNPACK) on the CPU, {self.threads} threads"


class LiteForward:
    """forward.Forward's interface over the interpreter: `put` (in the reader threads) turns
    a uint8 batch into float32, and its mirror with flip; `forward(views)` runs each view;
    `fetch` has nothing to wait for. run_forward, batch_stream and the resume need no change."""

    runtime = "litert"

    def __init__(self, path: Path, spec: BackboneSpec, batch_size: int, flip: bool, threads: int):
        self.path, self.batch_size, self.flip = path, batch_size, flip
        self.placement = _CpuThreads(threads)
        self._runner = _Runner(path, batch_size, threads)
        self.output_shape = self._runner.output_shape

    def put(self, batch: np.ndarray) -> list[np.ndarray]:
        plain = batch.astype(np.float32)
        return [plain, np.ascontiguousarray(plain[:, :, ::-1])] if self.flip else [plain]

    def __call__(self, views: list[np.ndarray]) -> list[np.ndarray]:
        return [self._runner.run(view) for view in views]

    @staticmethod
    def fetch(outputs: list[np.ndarray]) -> list[np.ndarray]:
        return outputs

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self(self.put(batch))
