"""The measured work, run in fresh child processes: `python bench/tasks.py '{"task": ...}'`.

Each task prints its result as one JSON line. Heavy imports happen inside the tasks, before the
clock starts; the module itself imports the standard library only, so the parent can use its
helpers. The pipeline is driven through the public API of dogscats only; each bare counterpart
is written here with OpenCV or the compiled forward pass alone.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from child import RESULT_MARK

SPLITS = ("train", "test")
PRECISIONS = ("float32", "bfloat16")
# arrays.preprocess writes each decoded row with one pwrite; the bare loop that writes does too.


def main() -> None:
    """Run one task, print its result (with this process's memory peaks) as one JSON line."""
    request = json.loads(sys.argv[1])
    result = TASKS[request["task"]](**request["kwargs"])
    result["rss_self_mb"] = _maxrss_mb(resource.RUSAGE_SELF)
    result["rss_children_mb"] = _maxrss_mb(resource.RUSAGE_CHILDREN)  # largest pool worker
    result["minor_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(RESULT_MARK + json.dumps(result), flush=True)


def _maxrss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports kB


def image_files(data_dir: str) -> list[str]:
    """Every train and test JPEG, in the order the pipeline lists them (sorted by name)."""
    return [
        os.path.join(data_dir, split, name)
        for split in SPLITS
        for name in sorted(os.listdir(os.path.join(data_dir, split)))
        if name.endswith(".jpg")
    ]


def _clock() -> tuple[float, float]:
    """(wall clock, CPU seconds of this process and of its children reaped so far)."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return time.perf_counter(), own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _since(start: tuple[float, float]) -> dict[str, float]:
    """Wall and CPU seconds since `start`: CPU time barely moves with the load of a shared
    machine, so it tells extra work from waiting."""
    wall, cpu = _clock()
    return {"seconds": wall - start[0], "cpu_s": cpu - start[1]}


# ---------------------------------------------------------------------------------------------
# Preprocessing and its bare loops


def task_preprocess(data_dir: str, size: int, out_dir: str, workers: int) -> dict:
    """`make preprocess`'s work: arrays.preprocess end to end (listing, pool, fsync, rename)."""
    from dogscats import arrays

    start = _clock()
    manifest = arrays.preprocess(data_dir, size, out_dir=out_dir, workers=workers, progress=False)
    return {**_since(start), "images": sum(manifest["counts"].values())}


def _bare_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # as the pipeline's workers: one process per core


def _bare_decode(task: tuple[list[str], int, str | None, int, int]) -> int:
    """imread, cvtColor, resize each file; discard the result, or write it at its row of `out`
    to price the writing apart from the pipeline's own overhead. Written as the pipeline's
    workers write: resized into a buffer of `run_rows` rows, one pwrite per full buffer."""
    import cv2
    import numpy as np

    paths, size, out, first_row, run_rows = task
    if not out:
        for path in paths:
            rgb = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
            # Kept until the next image's is made: freed at once, glibc returns the heap top
            # to the kernel and faults it in again for the next image, which would slow the
            # bare loop for a reason of no interest here.
            image = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)  # noqa: F841
        return len(paths)
    row_bytes = size * size * 3
    rows = np.empty((run_rows, size, size, 3), dtype=np.uint8)
    fd = os.open(out, os.O_WRONLY)
    try:
        for start in range(0, len(paths), run_rows):
            batch = paths[start : start + run_rows]
            for slot, path in enumerate(batch):
                rgb = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
                cv2.resize(rgb, (size, size), dst=rows[slot], interpolation=cv2.INTER_LINEAR)
            os.pwrite(fd, rows[: len(batch)].data, (first_row + start) * row_bytes)
    finally:
        os.close(fd)
    return len(paths)


def task_enlarge(source: str, target: str, width: int, height: int, quality: int = 90) -> dict:
    """Every image of `source` enlarged to width x height and saved as JPEG under `target`:
    synthetic, but as costly to decode as the competition's photos (most are about 500x375),
    which the 200x200 sample is not. Written under /tmp, never into the repo."""
    import cv2

    for split in SPLITS:
        os.makedirs(os.path.join(target, split))
    files = image_files(source)
    for path in files:
        image = cv2.resize(cv2.imread(path), (width, height), interpolation=cv2.INTER_CUBIC)
        out = os.path.join(target, os.path.relpath(path, source))
        cv2.imwrite(out, image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    mean_bytes = sum(
        os.path.getsize(os.path.join(target, os.path.relpath(p, source))) for p in files
    )
    return {"images": len(files), "mean_kb": mean_bytes / len(files) / 1024, "quality": quality}


def _pool_context():
    """fork where the platform has it, as arrays.preprocess does: the bare loop gets the same
    cheap worker start-up, so the pipeline is not flattered."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def task_bare_decode(
    data_dir: str, size: int, workers: int, out: str | None = None, chunk: int = 64
) -> dict:
    """The bare loop over a pool of `workers` processes (start-up included), like the
    pipeline's pool: tasks of `chunk` files, results in completion order."""
    import cv2  # noqa: F401  (imported before the fork, as arrays.preprocess has it)

    files = image_files(data_dir)
    run_rows = 1 if out else 0
    tasks = [(files[i : i + chunk], size, out, i, run_rows) for i in range(0, len(files), chunk)]
    start = _clock()
    if out:  # preallocated, as the pipeline's array: both pay the same for each write
        with open(out, "wb") as handle:
            handle.truncate(len(files) * size * size * 3)
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(handle.fileno(), 0, len(files) * size * size * 3)
    with _pool_context().Pool(workers, initializer=_bare_init) as pool:
        done = sum(pool.imap_unordered(_bare_decode, tasks))
    if out:  # timed: without it the kernel writes the rows back later, unpaid by any variant
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    result = _since(start)
    if out:
        os.unlink(out)
    return {**result, "images": done}


def task_seeds_loop(data_dir: str, size: int) -> dict:
    """The seed notebooks' way: one loop in one process filling an in-RAM array."""
    import cv2
    import numpy as np

    files = image_files(data_dir)
    start = _clock()
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for row, path in enumerate(files):
        rgb = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        images[row] = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
    return {**_since(start), "images": len(files)}


# ---------------------------------------------------------------------------------------------
# Feature extraction and its bare forward pass


def _forward_setup(
    backbone: str,
    weights: str,
    precision: str,
    batch_size: int,
    arrays_dir: str,
    tta: str = "none",
) -> tuple[object, object]:
    """The compiled forward pass `extract` builds (the same public calls, on the same
    devices), and one real batch in host memory, as the reader hands it over."""
    import numpy as np

    from dogscats import arrays
    from dogscats.backbones import get_backbone

    step = _build_forward(get_backbone(backbone), weights, precision, batch_size, tta)
    images, _ = arrays.load_split(arrays_dir, "train")
    batch = np.zeros((batch_size, *images.shape[1:]), np.uint8)
    rows = min(batch_size, len(images))
    batch[:rows] = images[:rows]
    _time_forward(step, batch, 2)  # compile and warm up: not part of the bare figure
    return step, batch


def _fixed_cost(
    backbone: str, weights: str, precision: str, batch_size: int, batch: object, tta: str
) -> float:
    """Seconds to build the model again and compile its forward pass, as `extract` does before
    its first batch (file opening aside). Timed on a second build in a process that has built
    one already, as `extract`'s is here: the first pays one-off start-up costs besides."""
    from dogscats.backbones import get_backbone

    spec = get_backbone(backbone)
    start = time.perf_counter()
    step = _build_forward(spec, weights, precision, batch_size, tta)
    build_s = time.perf_counter() - start
    first, warm = _time_forward(step, batch, 2, in_flight=False)
    return build_s + max(first - warm, 0.0)


def _build_forward(spec, weights: str, precision: str, batch_size: int, tta: str):
    """features.build_forward, on the DEVICES of the environment, as `make features` passes."""
    from dogscats import features

    devices = os.environ.get("DEVICES", "auto")
    return features.build_forward(spec, weights, None, precision, batch_size, tta, devices)


def _time_forward(step, batch: object, calls: int, in_flight: bool = True) -> list[float]:
    """Seconds per call of `calls` forward passes on a host batch: copied to the devices,
    computed and fetched, as extract() does but with no disk or file in the way. With
    `in_flight`, the next call is dispatched before the last one is fetched, as in
    run_forward; each figure is then the time between two fetches."""
    times: list[float] = []
    start, pending = time.perf_counter(), None
    for _ in range(calls):
        outputs = step(step.put(batch))
        if in_flight:  # fetch the previous call's outputs instead
            outputs, pending = pending, outputs
            if outputs is None:
                continue
        step.fetch(outputs)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    if pending is not None:
        step.fetch(pending)
        times.append(time.perf_counter() - start)
    return times


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _forward_calls(arrays_dir: str, batch_size: int) -> tuple[int, int]:
    """(images, forward calls) of one extraction: each split's last batch is zero-padded."""
    from dogscats import arrays

    counts = arrays.read_manifest(arrays_dir)["counts"]
    calls = sum(-(-counts[split] // batch_size) for split in SPLITS)
    return sum(counts[split] for split in SPLITS), calls


def _timed_extract(**kwargs: object) -> dict[str, float]:
    """features.extract() as one whole public call: wall seconds, and CPU seconds of all this
    process's threads (which the load of a shared machine barely changes)."""
    from dogscats import features

    cpu, start = time.process_time(), time.perf_counter()
    features.extract(progress=False, **kwargs)
    return {"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


def task_features(
    data_dir: str,
    arrays_dir: str,
    backbone: str,
    weights: str,
    batch_size: int,
    out: str,
    precision: str = "float32",
    tta: str = "none",
) -> dict:
    """extract() end to end between two halves of the bare forward pass, so that a slow drift
    in the machine's load hits both alike. CPU seconds (all threads of the process) resist
    load altogether."""
    images, calls = _forward_calls(arrays_dir, batch_size)
    forward, batch = _forward_setup(backbone, weights, precision, batch_size, arrays_dir, tta)
    fixed_s = _fixed_cost(backbone, weights, precision, batch_size, batch, tta)
    cpu = time.process_time()
    bare = _time_forward(forward, batch, calls // 2)
    bare_cpu = time.process_time() - cpu
    pipeline = _timed_extract(
        runtime="keras",  # this row prices the loop around TensorFlow's step; litert has its own
        data_dir=data_dir,
        backbone=backbone,
        weights=weights,
        batch_size=batch_size,
        arrays_dir=arrays_dir,
        out=out,
        precision=precision,
        tta=tta,
        devices=os.environ.get("DEVICES", "auto"),
    )
    cpu = time.process_time()
    bare += _time_forward(forward, batch, calls - calls // 2)
    bare_cpu += time.process_time() - cpu
    return {
        "images": images,
        "calls": calls,
        "pipeline_s": pipeline["seconds"],
        "fixed_s": fixed_s,
        "bare_s": sum(bare),
        "bare_batch_median_s": _median(bare),
        "pipeline_cpu_s": pipeline["cpu_s"],
        "bare_cpu_s": bare_cpu,
    }


def task_extract(
    data_dir: str, arrays_dir: str, backbone: str, weights: str, batch_size: int, out: str
) -> dict:
    images, _ = _forward_calls(arrays_dir, batch_size)
    timed = _timed_extract(
        data_dir=data_dir,
        backbone=backbone,
        weights=weights,
        batch_size=batch_size,
        arrays_dir=arrays_dir,
        out=out,
    )
    return {"images": images, **timed}


def task_row_check(arrays_dir: str, batch_size: int, repeats: int = 3) -> dict:
    """The row-digest check alone (arrays.RowCheck, as extraction calls it on each batch
    read), timed over every row of both splits; beside it zlib.crc32 of the same rows, the
    standard library's fastest hash. Batches are read untimed, as extraction's reader threads
    read them; the best of `repeats` passes counts."""
    import zlib

    import numpy as np

    from dogscats import arrays

    timed = {"check": [], "crc32": []}
    rows = 0
    for _ in range(repeats):
        passes = {"check": 0.0, "crc32": 0.0}
        rows = 0
        for split in SPLITS:
            images, index = arrays.load_split(arrays_dir, split)
            check = arrays.row_check(arrays_dir, split, index)
            for first in range(0, len(images), batch_size):
                batch = np.array(images[first : first + batch_size])
                start = time.perf_counter()
                check(first, batch)
                passes["check"] += time.perf_counter() - start
                start = time.perf_counter()
                for row in batch:
                    zlib.crc32(row)
                passes["crc32"] += time.perf_counter() - start
                rows += len(batch)
        for name, seconds in passes.items():
            timed[name].append(seconds)
    return {
        "rows": rows,
        "row_bytes": int(np.prod(images.shape[1:])),
        "check_s": min(timed["check"]),
        "crc32_s": min(timed["crc32"]),
    }


def task_litert(
    backbones: list[str], weights: str, batch_size: int, rounds: int, calls: int, workers: int
) -> dict:
    """LiteRT's forward pass (the one `extract` runs with RUNTIME=litert: reader-side cast,
    interpreter on `workers` threads) against TensorFlow's bare compiled forward pass, per
    backbone at its registry size, on one real-sized batch, alternated round by round in this
    one process so that the machine's load hits both alike. Export (or cache) time apart."""
    import numpy as np

    from dogscats import features
    from dogscats.backbones import get_backbone

    rows = {}
    for name in backbones:
        spec = get_backbone(name)
        keras_step = features.build_forward(spec, weights, None, "float32", batch_size, "none")
        start = time.perf_counter()
        lite_step = features.build_forward(
            spec, weights, None, "float32", batch_size, "none", runtime="litert", workers=workers
        )
        export_s = time.perf_counter() - start
        batch = np.random.default_rng(0).integers(
            0, 256, (batch_size, spec.input_size, spec.input_size, 3), dtype=np.uint8
        )
        difference = float(np.abs(keras_step.run(batch)[0] - lite_step.run(batch)[0]).max())
        steps = {"tensorflow": keras_step, "litert": lite_step}
        for step in steps.values():
            _time_forward(step, batch, 2)  # warm up
        times: dict[str, list[float]] = {runtime: [] for runtime in steps}
        for round_ in range(rounds):
            order = list(steps) if round_ % 2 == 0 else list(steps)[::-1]
            for runtime in order:
                times[runtime] += _time_forward(steps[runtime], batch, calls)
        medians = {runtime: _median(t) for runtime, t in times.items()}
        rows[name] = {
            "input_size": spec.input_size,
            "export_or_load_s": export_s,
            "max_abs_diff": difference,
            "median_s": medians,
            "rate": {runtime: batch_size / m for runtime, m in medians.items()},
            "speedup": medians["tensorflow"] / medians["litert"],
            "calls": {runtime: len(t) for runtime, t in times.items()},
        }
    return {"backbones": rows}


def task_precision(
    data_dir: str,
    arrays_dir: str,
    backbone: str,
    weights: str,
    batch_size: int,
    rounds: int,
    calls: int,
    work: str | None = None,
) -> dict:
    """float32 against bfloat16 in one process (one TensorFlow start): with `work`, both full
    extractions into feature files there and their difference; always the bare forward passes
    of both, alternated round by round so that drift in load hits both alike."""
    result: dict = {}
    if work:
        files = {p: os.path.join(work, f"{backbone}.{p}.h5") for p in PRECISIONS}
        result["extract"] = {
            precision: _timed_extract(
                data_dir=data_dir,
                backbone=backbone,
                weights=weights,
                precision=precision,
                batch_size=batch_size,
                arrays_dir=arrays_dir,
                out=out,
            )
            for precision, out in files.items()
        }
        result["files"] = files
        result["diff"] = _feature_difference(files["float32"], files["bfloat16"])
    passes = {p: _forward_setup(backbone, weights, p, batch_size, arrays_dir) for p in PRECISIONS}
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(rounds):
        for precision, (forward, batch) in passes.items():
            times[precision] += _time_forward(forward, batch, calls)
    result["bare"] = {
        "images": rounds * calls * batch_size,
        "seconds": {p: sum(t) for p, t in times.items()},
        "median_s": {p: _median(t) for p, t in times.items()},
    }
    return result


def _split_features(path: str) -> object:
    """The plain features of both splits, read straight from the file (its layout is
    documented in dogscats/features.py: <split>/features)."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as handle:
        return np.concatenate([handle[split]["features"][...] for split in SPLITS])


def _feature_difference(first: str, second: str) -> dict:
    """Largest and typical difference between two feature files of the same images."""
    import numpy as np

    a, b = _split_features(first), _split_features(second)
    diff = np.abs(a - b)
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    return {
        "max_abs_diff": float(diff.max()),
        "max_abs_value": float(np.abs(a).max()),
        "mean_abs_diff": float(diff.mean()),
        "max_rel_l2": float(rel.max()),
        "mean_rel_l2": float(rel.mean()),
    }


# ---------------------------------------------------------------------------------------------
# Fine-tuning against the forward pass (where a fit's time goes)


def task_finetune(
    arrays_dir: str,
    backbone: str,
    blocks: int,
    augment: str,
    batch_size: int,
    batches: int,
    epochs: int,
    augmentation: bool = True,
) -> dict:
    """`model.fit` of the fine-tuning model as `make finetune` builds it (random weights), on
    about `batches` batches with a partial last one as a real fold has, validating each epoch
    as the trainer does; and the bare forward pass of the whole backbone on the same batch
    size. Per epoch: seconds of the training steps (first batch end to last) and of the whole
    epoch; on JAX, the programs compiled in each epoch and their seconds."""
    import keras
    import numpy as np

    from dogscats import arrays
    from dogscats.backbones import build_backbone, get_backbone
    from dogscats.finetune import model as tuning
    from dogscats.finetune.inputs import EpochDraws, Source, make_dataset

    spec = get_backbone(backbone)
    images, index = arrays.load_split(arrays_dir, "train")
    rows = np.arange(min(len(images), batches * batch_size - batch_size // 4))
    labels = index["label"].to_numpy(np.float32)
    keras.utils.set_random_seed(0)
    net = build_backbone(backbone, weights="random", input_size=images.shape[1], pooling=None)
    cut = tuning.cut_backbone(net, spec, blocks)
    if augment == "flip":  # the cache of maps at the cut, as build_cache makes it (not timed)
        source = Source(*[_maps_at_cut(cut, spec, images[: len(rows)], batch_size)] * 2, True)
    else:
        source = Source(images, images, cached=False)
    if not augmentation:  # the same model with the random-transform layers left out
        tuning.augmentation = lambda: keras.layers.Identity(name="augment")
    fine = tuning.build_model(cut, backbone, augment, source.item_shape, dropout=0.5)
    tuning.compile_model(fine.model, 3e-4, -(-len(rows) // batch_size), epochs)
    train_set = make_dataset(source, "train", rows, labels, batch_size, True, seed=0)
    stop = make_dataset(source, "train", rows[: 2 * batch_size], labels, batch_size, False)
    watch = _fit_watch()
    fine.model.fit(
        train_set,
        validation_data=stop,
        epochs=epochs,
        verbose=0,
        callbacks=[EpochDraws(train_set), watch],
    )
    forward, batch = _forward_setup(backbone, "random", "float32", batch_size, arrays_dir)
    bare = _time_forward(forward, batch, 6)
    return {
        "backend": keras.backend.backend(),
        "images": len(rows),
        "batch_size": batch_size,
        "epochs": watch.epochs,
        # the steps after each epoch's first: every one but the last is a full batch
        "train_rate": (len(rows) - batch_size) / min(e["steps_s"] for e in watch.epochs[1:]),
        "forward_rate": batch_size / _median(bare),
    }


def _maps_at_cut(cut, spec, images, batch_size: int):
    """(N, 2 views, h, w, c) float32 maps at the cut, as fine-tuning's cache holds them."""
    import dataclasses

    import numpy as np

    from dogscats.forward import make_forward, run_forward

    sized = dataclasses.replace(spec, input_size=int(images.shape[1]))
    bottom = make_forward(cut.bottom, sized, batch_size, flip=True)
    parts: dict[int, list] = {}
    run_forward(images, bottom, batch_size, parts.__setitem__, progress=False)
    return np.concatenate([np.stack(parts[first], axis=1) for first in sorted(parts)])


def _fit_watch():
    """A Keras callback recording each epoch's times and, on JAX, the programs XLA compiled
    during it (defined here: this module imports no Keras at the top)."""
    import keras

    class FitWatch(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs: list[dict] = []
            self.compiled: list[float] = []
            if keras.backend.backend() == "jax":
                from jax import monitoring

                monitoring.register_event_duration_secs_listener(self._compile)

        def _compile(self, event: str, seconds: float, **_: object) -> None:
            if event == "/jax/core/compile/backend_compile_duration":
                self.compiled.append(seconds)

        def on_epoch_begin(self, epoch, logs=None):
            self.began, self.ends, self.seen = time.perf_counter(), [], len(self.compiled)

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            compiled = self.compiled[self.seen :]
            self.epochs.append(
                {
                    "epoch_s": time.perf_counter() - self.began,
                    "first_batch_s": self.ends[0] - self.began,
                    "steps_s": self.ends[-1] - self.ends[0],  # every step after the first
                    "steps": len(self.ends),
                    "compiles": len(compiled),
                    "compile_s": sum(compiled),
                }
            )

    return FitWatch()


def task_cut_cache(
    arrays_dir: str, backbone: str, weights: str, batch_size: int, runtime: str, work: str
) -> dict:
    """Fine-tuning's cut cache of BLOCKS=1, built twice as `make finetune` builds it: from the
    images (the bottom over every image and its mirror), and derived from a BLOCKS=2 cache made
    first (only the block between runs over its maps). Seconds of each, and the largest
    difference between the two caches."""
    import numpy as np

    from dogscats import arrays
    from dogscats.backbones import build_backbone, get_backbone
    from dogscats.finetune import cache
    from dogscats.finetune import model as tuning

    spec = get_backbone(backbone)
    manifest = arrays.read_manifest(arrays_dir)
    size = int(arrays.load_split(arrays_dir, "train")[0].shape[1])
    net = build_backbone(backbone, weights=weights, input_size=size, pooling=None)
    settings = {"weights": weights, "input_size": size, "cache_dtype": "float32"}
    settings["fingerprint"] = manifest["fingerprint"]
    seconds, maps = {}, {}

    def build(name: str, blocks: int, root: Path, lower=None) -> None:
        cut = tuning.cut_backbone(net, spec, blocks)
        folder = cache.cache_folder(root, backbone, spec.blocks[-blocks - 1], settings)
        began = time.perf_counter()
        built = cache.build_cache(
            folder,
            cut,
            spec,
            Path(arrays_dir),
            batch_size,
            "float32",
            False,
            len,
            runtime,
            lower=lower,
        )
        seconds[name] = time.perf_counter() - began
        maps[name] = built

    shared, alone = Path(work) / "shared", Path(work) / "alone"
    build("lower", 2, shared)
    build("images", 1, alone)
    lower = cache.lower_cache(shared, spec, 1, settings, Path(arrays_dir))
    build("derived", 1, shared, lower)
    difference = max(
        float(np.abs(np.asarray(maps["images"][s]) - np.asarray(maps["derived"][s])).max())
        for s in ("train", "test")
    )
    return {
        "images": sum(manifest["counts"].values()),
        "input_size": size,
        "lower_s": seconds["lower"],
        "from_images_s": seconds["images"],
        "derived_s": seconds["derived"],
        "max_abs_diff": difference,
        "max_abs_value": float(np.abs(np.asarray(maps["images"]["test"])).max()),
        "lower_cut": lower.cut,
        "cut": spec.blocks[-2],
    }


TASKS: dict[str, Callable[..., dict]] = {
    "preprocess": task_preprocess,
    "bare_decode": task_bare_decode,
    "enlarge": task_enlarge,
    "seeds_loop": task_seeds_loop,
    "features": task_features,
    "extract": task_extract,
    "row_check": task_row_check,
    "precision": task_precision,
    "finetune": task_finetune,
    "litert": task_litert,
    "cut_cache": task_cut_cache,
}


if __name__ == "__main__":
    main()
