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
from either runtime share one file name. README ('Runtimes') has the measured speeds.
"""

from __future__ import annotations

import math
import os
import re
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
):
    """The forward pass `runtime` asks for: a LiteForward, or forward.make_forward's step.
    `name` (default the backbone's) names the export; under `auto`, a network that does not
    export or match falls back to Keras with one line."""
    if wanted(runtime, where, precision):
        try:
            path = export(model, spec, name or config.backbone_stem(spec.name), log)
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
        _litert_version(),
    )
    safe = re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)
    return cache_dir() / f"{safe}-{spec.input_size}-{key[:16]}.tflite"


def export(model, spec: BackboneSpec, name: str, log=print) -> Path:
    """The checked export of `model` (with spec's preprocessing) from the cache, made first if
    need be. A cache file that no longer loads or matches is set aside and rebuilt. Raises
    RuntimeChoiceError when the export fails or its outputs differ from Keras's."""
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
                return path
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
        return path


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


def _litert_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai-edge-litert")
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
