"""A network over the image arrays, on whichever Keras backend and devices are in use.

`KERAS_BACKEND` (tensorflow by default, jax, torch) picks the backend; `DEVICES` picks the
devices (`place`). Three pieces, shared by feature extraction and fine-tuning's cache:
    make_forward   the compiled step uint8 batch -> [features (, features of the mirror)]
    batch_stream   fixed-size batches read from the memory map by a prefetching thread
    run_forward    the resumable loop: step, fetch, write, one batch kept in flight
Keras's own `predict_on_batch` is not used: on JAX it copies every weight back into the model
and waits for the result after each batch, which leaves an accelerator idle between batches.
"""

from __future__ import annotations

import mmap
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from dogscats import config
from dogscats.backbones import BackboneSpec
from dogscats.backbones.weights import keras_home


class DeviceError(ValueError):
    pass


@dataclass
class Placement:
    """The backend and devices a forward pass runs on; several devices split each batch
    (keras.distribution.DataParallel, JAX only)."""

    backend: str
    devices: list[str]
    distribution: Any = None  # keras.distribution.DataParallel when len(devices) > 1
    notes: list[str] = field(default_factory=list)

    def scope(self) -> AbstractContextManager:
        """Build models inside this scope: their variables are then laid out on the devices."""
        return self.distribution.scope() if self.distribution is not None else nullcontext()

    def batch_size(self, wanted: int) -> int:
        """`wanted` rounded up to a multiple of the device count (each device gets a share)."""
        count = len(self.devices)
        return -(-wanted // count) * count

    def describe(self) -> str:
        kind = "device" if len(self.devices) == 1 else "devices"
        text = f"{self.backend} on {len(self.devices)} {kind} ({', '.join(self.devices)})"
        return "; ".join([text, *self.notes])


def place(devices: str = "auto") -> Placement:
    """The devices `devices` names, on the backend in use."""
    import keras

    try:
        wanted = config.parse_devices(devices)
    except ValueError as error:
        raise DeviceError(str(error)) from None
    backend = keras.backend.backend()
    if backend == "torch":
        return _place_torch(wanted)
    if backend == "jax":
        import jax

        _persistent_compile_cache(jax)
    available = _choose(backend, wanted)
    if len(available) > 1:
        return Placement(backend, available, distribution=_split(backend, available))
    return Placement(backend, available, distribution=_one_device(backend, available[0]))


def check_devices(devices: str = "auto") -> None:
    """Refuse DEVICES=N beyond what the backend sees, before any long work (make runs it ahead
    of preprocessing). `auto`, `cpu` and 1 always fit: the backend is not even started."""
    try:
        wanted = config.parse_devices(devices)
    except ValueError as error:
        raise DeviceError(str(error)) from None
    if not isinstance(wanted, int) or wanted == 1:
        return
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        _place_torch(wanted)
    else:
        _choose(backend, wanted)


def _choose(backend: str, wanted: str | int) -> list[str]:
    """The devices to use, from what Keras lists for the backend: its accelerators, else its
    CPU devices (one, unless a test split the CPU). `auto` takes every accelerator, else one
    CPU device: virtual CPU devices share the same cores, so splitting over them gains nothing."""
    import keras

    available = keras.distribution.list_devices("cpu" if wanted == "cpu" else None)
    if wanted == "cpu":
        return available[:1]
    if isinstance(wanted, int):
        if wanted > len(available):
            raise DeviceError(
                f"DEVICES={wanted}, but {backend} sees {len(available)}: {', '.join(available)}. "
                f"Use DEVICES=auto, or a count up to {len(available)}."
            )
        return available[:wanted]
    return available if not available[0].startswith("cpu") else available[:1]


def _split(backend: str, devices: list[str]) -> Any:
    """What splits each batch over several devices: Keras's DataParallel on JAX; on
    TensorFlow, where Keras's distribution API is a prototype, tf.distribute's
    MirroredStrategy (one replica of the weights per device)."""
    if backend == "jax":
        import keras

        return keras.distribution.DataParallel(devices=devices)
    import tensorflow as tf

    return _Mirrored(tf.distribute.MirroredStrategy([f"/{d.upper()}" for d in devices]))


def _one_device(backend: str, device: str) -> Any:
    if backend != "jax":
        return None  # TensorFlow places ops on its first GPU itself, else on the CPU
    import jax

    platform, _, index = device.partition(":")
    return _OneDevice(jax.devices(platform)[int(index or 0)])


def _persistent_compile_cache(jax) -> None:
    """Keep JAX's compiled programs on disk (beside the weights Keras caches), unless the user
    chose a folder: a second extraction then skips most of its compilation, which on a GPU
    costs more than the data (README, 'GPUs')."""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(keras_home() / "jax_cache"))
    # The default keeps only programs that took a second or more; the model's many small
    # variable initialisers each take less, and together take seconds.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def _place_torch(wanted: str | int) -> Placement:
    """PyTorch runs on one device here (Keras puts tensors on the first GPU when there is
    one): Keras's distribution API does not reach PyTorch."""
    import torch

    if isinstance(wanted, int) and wanted > 1:
        raise DeviceError(
            f"DEVICES={wanted} splits batches over devices with KERAS_BACKEND=jax or "
            "tensorflow; torch runs on one device here."
        )
    accelerators = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if wanted == "cpu" or not accelerators:
        return Placement("torch", ["cpu:0"])
    notes = []
    if len(accelerators) > 1:
        notes.append(f"{len(accelerators)} visible, 1 used: jax or tensorflow use all")
    return Placement("torch", [accelerators[0]], notes=notes)


@dataclass
class _OneDevice:
    """Stands in for a distribution on one JAX device: batches are put there, nothing split."""

    device: Any

    def scope(self) -> AbstractContextManager:
        import jax

        return jax.default_device(self.device)


@dataclass
class _Mirrored:
    """tf.distribute.MirroredStrategy as a Placement's distribution: models built in its
    scope hold one copy of their weights per device."""

    strategy: Any

    def scope(self) -> AbstractContextManager:
        return self.strategy.scope()


# ----------------------------------------------------------------------------------------------
# The compiled step


class Forward:
    """`forward(batch)` runs preprocess -> model (-> model on the mirrored batch) on a uint8
    batch of the compiled shape and returns backend tensors without waiting for them (JAX
    dispatches asynchronously); `fetch` turns them into float32 NumPy arrays."""

    runtime = "keras"  # what the feature file records (litert.LiteForward is the other)

    def __init__(self, model, spec: BackboneSpec, batch_size: int, flip: bool, where: Placement):
        if batch_size % len(where.devices):
            raise DeviceError(
                f"A batch of {batch_size} does not split over {len(where.devices)} devices; "
                "use Placement.batch_size() to round it."
            )
        self.batch_size, self.placement = batch_size, where
        self.output_shape = tuple(model.output_shape[1:])
        compute = _compute(model, spec.preprocess_fn(), flip)
        shape = (batch_size, spec.input_size, spec.input_size, 3)
        self._step, self._put = _COMPILERS[where.backend](model, compute, shape, where)

    def put(self, batch: np.ndarray) -> Any:
        """The host batch on the devices (run in the reader thread, so copies overlap work)."""
        return self._put(batch)

    def __call__(self, batch: Any) -> list[Any]:
        return self._step(batch)

    @staticmethod
    def fetch(outputs: list[Any]) -> list[np.ndarray]:
        import keras

        return [np.asarray(keras.ops.convert_to_numpy(o), np.float32) for o in outputs]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """One batch in, its outputs out, waiting for them."""
        return self.fetch(self(self.put(batch)))


def make_forward(
    model, spec: BackboneSpec, batch_size: int, flip: bool, where: Placement | None = None
) -> Forward:
    """The compiled forward pass of `model` for batches of `batch_size` images at
    spec.input_size, on `where` (default: one device, the backend's first accelerator, else
    the CPU: a model built outside a distribution's scope lives on one device)."""
    return Forward(model, spec, batch_size, flip, where or place("1"))


def _compute(model, preprocess: Callable, flip: bool) -> Callable:
    """uint8 batch -> float32 outputs, in keras.ops only, so that every backend compiles it."""
    from keras import ops

    def compute(batch):
        x = preprocess(ops.cast(batch, "float32"))
        outputs = [ops.cast(model(x, training=False), "float32")]
        if flip:
            mirrored = ops.flip(x, axis=2)
            outputs.append(ops.cast(model(mirrored, training=False), "float32"))
        return outputs

    return compute


def _compile_jax(model, compute: Callable, shape: tuple, where: Placement):
    """jax.jit of a stateless call: the weights are arguments, not constants baked into the
    program, and a batch sharded over several devices makes XLA split the work."""
    import jax
    import keras

    variables = model.trainable_variables + model.non_trainable_variables

    # float32 means float32: XLA on a GPU otherwise runs float32 convolutions in TF32, and the
    # features then miss the reference by 1e-2 (README, 'GPUs'). No effect on a CPU.
    exact = "highest" if model.compute_dtype == "float32" else None

    def stateless(values, batch):
        with (
            jax.default_matmul_precision(exact),
            keras.StatelessScope(state_mapping=list(zip(variables, values))),
        ):
            return compute(batch)

    jitted = jax.jit(stateless)
    values = [v.value for v in variables]
    distribution = where.distribution
    if isinstance(distribution, _OneDevice):

        def put(batch):
            return jax.device_put(batch, distribution.device)
    else:
        layout = distribution.get_data_layout(shape)

        def put(batch):
            return keras.distribution.distribute_tensor(batch, layout)

    return (lambda batch: jitted(values, batch)), put


def _compile_tensorflow(model, compute: Callable, shape: tuple, where: Placement):
    """A tf.function with a fixed input signature, so it is traced once. XLA stays off: on
    CPU it compiled slower than it ran (bench/REPORT.md)."""
    import tensorflow as tf

    if isinstance(where.distribution, _Mirrored):
        return _compile_mirrored(compute, shape, where.distribution.strategy)
    step = tf.function(compute, input_signature=[tf.TensorSpec(shape, tf.uint8)])
    device = f"/{where.devices[0].upper()}"

    def put(batch):
        with tf.device(device):
            return tf.identity(batch)

    return step, put


def _compile_mirrored(compute: Callable, shape: tuple, strategy):
    """Each device runs `compute` on its share of the batch; the shares' outputs are
    gathered back in batch order."""
    import tensorflow as tf

    share = shape[0] // strategy.num_replicas_in_sync

    @tf.function
    def step(shares):
        outputs = strategy.run(compute, args=(shares,))
        return [strategy.gather(output, axis=0) for output in outputs]

    def put(batch):
        def on_device(context):  # called once per device, under that device's scope
            first = context.replica_id_in_sync_group * share
            return tf.constant(batch[first : first + share])

        return strategy.experimental_distribute_values_from_function(on_device)

    return step, put


def _compile_torch(model, compute: Callable, shape: tuple, where: Placement):
    """Eager PyTorch under no_grad: Keras places tensors on the first GPU when there is one."""
    import keras
    import torch

    def step(batch):
        with torch.no_grad():
            return compute(batch)

    return step, keras.ops.convert_to_tensor


_COMPILERS = {"jax": _compile_jax, "tensorflow": _compile_tensorflow, "torch": _compile_torch}


# ----------------------------------------------------------------------------------------------
# Reading batches and the resumable loop

READERS = min(3, os.cpu_count() or 1)  # batches read ahead, each by its own thread


def batch_stream(
    images: np.ndarray,
    batch_size: int,
    start: int = 0,
    put: Callable[[np.ndarray], Any] = lambda batch: batch,
    ahead: int = READERS,
    check: Callable[[int, np.ndarray], None] | None = None,
) -> Iterator[tuple[int, int, Any]]:
    """(first row, rows, batch) for rows start.. in batches of `batch_size`, the last one
    zero-padded so that one compiled step serves every batch, in order. Reader threads read
    (and `put`) up to `ahead` batches while the caller works on the current one: plain
    threads, not tf.data, so that reading needs no backend. Several, because filling a fresh
    batch costs page faults and a copy to the device besides the read, and a fast
    accelerator finishes a batch sooner than one thread does that (pread, the copies and
    the faults all run outside the GIL). `check(first, rows)` (arrays.RowCheck) sees every
    batch as read, in the reader thread, before it goes to the device."""
    read = _RowReader(images)

    def load(first: int) -> Any:
        rows = min(batch_size, len(images) - first)
        batch = np.zeros((batch_size, *images.shape[1:]), images.dtype)
        read(first, batch[:rows])
        if check is not None:
            check(first, batch[:rows])
        return put(batch)

    firsts = iter(range(start, len(images), batch_size))
    queue: deque = deque()
    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="batches") as reader:
        try:
            for first in firsts:
                queue.append((first, reader.submit(load, first)))
                if len(queue) > ahead:
                    yield _ready(queue.popleft(), batch_size, len(images))
            while queue:
                yield _ready(queue.popleft(), batch_size, len(images))
        finally:
            for _, pending in queue:
                pending.cancel()
            reader.shutdown(wait=True)
            read.close()


def _ready(item: tuple, batch_size: int, total: int) -> tuple[int, int, Any]:
    first, pending = item
    return first, min(batch_size, total - first), pending.result()


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


def run_forward(
    images: np.ndarray,
    forward: Forward,
    batch_size: int,
    write: Callable[[int, list[np.ndarray]], None],
    start: int = 0,
    desc: str = "",
    progress: bool = True,
    check: Callable[[int, np.ndarray], None] | None = None,
) -> None:
    """The resumable loop of every stage that runs a network over the arrays (features, the
    fine-tuning cache): `forward` on rows start.. in fixed-size batches, then
    `write(first_row, outputs)` with the padding cut off; `write` records its own resume point.
    The next batch is dispatched before the last one's outputs are fetched, so that the
    device never waits for the host to write. `check`: see batch_stream.
    """
    in_flight = None
    bar = tqdm(total=len(images), initial=start, desc=desc, unit="img", disable=not progress)
    with bar:  # a bar stopped by an error ends its line, so the error's line starts afresh

        def finish(first: int, rows: int, outputs: list[Any]) -> None:
            write(first, [output[:rows] for output in forward.fetch(outputs)])
            bar.update(rows)

        for first, rows, batch in batch_stream(
            images, batch_size, start, forward.put, check=check
        ):
            outputs = forward(batch)
            if in_flight is not None:
                finish(*in_flight)
            in_flight = (first, rows, outputs)
        if in_flight is not None:
            finish(*in_flight)
