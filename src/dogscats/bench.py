"""`make bench`: each stage's speed and memory beside its bare counterpart, as a markdown report.

Every figure comes with the figure it is judged against, measured in the same run: the pipeline
against the bare OpenCV loop or the bare forward pass of the same compiled model. Each measured
piece of work runs in a fresh child process (`python -c ... _child_main`), so its peak RSS is
its own and no TensorFlow state leaks between measurements; the parent imports the standard
library only. `run(..., quick=True)` does the same on a tiny dataset in well under a minute, so
that tests/test_bench.py keeps the tool from rotting; its numbers mean nothing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from dogscats import config

STAGES = ("preprocess", "features", "scaling", "submission", "precision")
SPLITS = ("train", "test")
PRECISIONS = ("float32", "bfloat16")
_RESULT_MARK = "@@bench-result@@ "
_TF_MODULES = ("tensorflow", "keras", "numpy", "h5py")  # none may load in a warm `make`


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run. The default takes roughly 15-25 minutes on 2 cores."""

    size: int = 224  # input size of both throughput backbones
    workers: int = os.cpu_count() or 1
    repeats: int = 5  # preprocessing variants are interleaved this many times; best counts
    preprocess_scales: tuple[int, ...] = (1, 4)  # the data set, then 4x as many symlinks
    enlarged: tuple[int, int] | None = (500, 375)  # also on the images enlarged to this size
    batch_size: int = 32
    backbones: tuple[str, ...] = ("resnet50", "efficientnet_lite0")
    feature_repeats: int = 3  # pipeline-and-bare runs per backbone, best of each counts...
    feature_budget_s: float = 200.0  # ...while this lasts: a slow backbone gets one run
    n_small: int = 1000  # N train images (N/2 test) for memory and growth; then 4N
    growth_backbone: str = "efficientnet_lite0"
    submission_backbones: str = "offline"
    submission_args: tuple[str, ...] = ()
    precision_backbones: tuple[str, ...] = ("efficientnet_lite0", "resnet50")
    precision_weights: str = "imagenet"  # the log loss change needs real weights
    precision_rounds: int = 4  # alternations of float32 / bfloat16 bare forward passes
    precision_calls: int = 5  # forward calls per alternation
    folds: int = 5


QUICK = Plan(
    repeats=1,
    feature_repeats=1,
    preprocess_scales=(1, 2),
    batch_size=4,
    backbones=("efficientnet_lite0",),
    n_small=8,
    submission_backbones="efficientnet_lite0",
    submission_args=("WEIGHTS=random", "FOLDS=2"),
    precision_backbones=("efficientnet_lite0",),
    precision_weights="random",
    precision_rounds=1,
    precision_calls=1,
    folds=2,
)


@dataclass
class Context:
    data_dir: Path
    work: Path  # scratch folder under /tmp, removed at the end
    plan: Plan
    arrays: dict[int, Path] = field(default_factory=dict)  # sample arrays by input size


# ---------------------------------------------------------------------------------------------
# Child processes and their memory


def _child_main() -> None:
    """Entry point of a measurement child: run one task, print its result as one JSON line."""
    request = json.loads(sys.argv[1])
    result = _TASKS[request["task"]](**request["kwargs"])
    result["rss_self_mb"] = _maxrss_mb(resource.RUSAGE_SELF)
    result["rss_children_mb"] = _maxrss_mb(resource.RUSAGE_CHILDREN)  # largest pool worker
    print(_RESULT_MARK + json.dumps(result), flush=True)


def _maxrss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports kB


def _in_child(task: str, sample_memory: bool = False, **kwargs: object) -> dict:
    """Run `task(**kwargs)` in a fresh interpreter; add wall time and, if asked, the peaks of
    the RSS and PSS summed over its process tree (sampled, so a short spike can be missed)."""
    request = json.dumps({"task": task, "kwargs": kwargs})
    command = [sys.executable, "-c", "from dogscats.bench import _child_main; _child_main()"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    with subprocess.Popen(
        [*command, request], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        sampler = _TreeMemory(proc.pid) if sample_memory else None
        out, err = proc.communicate()
        if sampler:
            sampler.stop()
    lines = [line for line in out.splitlines() if line.startswith(_RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench task {task} failed (exit {proc.returncode}):\n{err[-3000:]}")
    result = json.loads(lines[-1][len(_RESULT_MARK) :])
    result["process_wall_s"] = time.perf_counter() - start
    if sampler:
        result["tree_rss_mb"] = sampler.peak_kb["Rss"] / 1024
        result["tree_pss_mb"] = sampler.peak_kb["Pss"] / 1024
    return result


class _TreeMemory(threading.Thread):
    """Samples the memory of a process and all its descendants; keeps the peak sums.

    Two sums: RSS counts shared pages (libraries) once per process, so it overstates a pool;
    PSS divides shared pages among every process mapping them, other users' processes
    included, so it can understate. The truth lies between.
    """

    def __init__(self, root: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_kb = {"Rss": 0, "Pss": 0}
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.is_set():
            sample = [_rollup_kb(pid) for pid in _tree(self.root)]
            for key in self.peak_kb:
                self.peak_kb[key] = max(self.peak_kb[key], sum(s.get(key, 0) for s in sample))
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _tree(root: int) -> list[int]:
    """root and its live descendants, from the parent ids in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _rollup_kb(pid: int) -> dict[str, int]:
    """Rss and Pss (kB) of one process from /proc/<pid>/smaps_rollup; empty if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in re.findall(r"^(Rss|Pss):\s+(\d+) kB", text, re.MULTILINE)}


# ---------------------------------------------------------------------------------------------
# Tasks (run inside the children; heavy imports happen here, before the clock starts)


def _image_files(data_dir: str) -> list[str]:
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


def task_preprocess(data_dir: str, size: int, out_dir: str, workers: int) -> dict:
    """`make preprocess`'s work: arrays.preprocess end to end (listing, pool, fsync, rename).

    os.fsync is wrapped only to add up the time the run waits to make the arrays durable
    (the background flusher's fdatasync calls overlap the decoding and are not counted).
    """
    from dogscats import arrays

    real_fsync, fsync_s = os.fsync, [0.0]

    def timed_fsync(fd: int) -> None:
        start = time.perf_counter()
        real_fsync(fd)
        fsync_s[0] += time.perf_counter() - start

    os.fsync = timed_fsync
    try:
        start = _clock()
        manifest = arrays.preprocess(
            data_dir, size, out_dir=out_dir, workers=workers, progress=False
        )
        result = _since(start)
    finally:
        os.fsync = real_fsync
    return {**result, "images": sum(manifest["counts"].values()), "fsync_s": fsync_s[0]}


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
            # to the kernel and faults it in again for the next image (measured 0.35 vs 0.43 s
            # on the sample; as fast as kept with MALLOC_TRIM_THRESHOLD_ raised), which would
            # slow the bare loop for a reason of no interest here.
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
    files = _image_files(source)
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

    files = _image_files(data_dir)
    run_rows = 0
    if out:  # imported only here: the bare loop without writes stays free of pandas & co.
        from dogscats.arrays import WRITE_BYTES

        run_rows = max(1, WRITE_BYTES // (size * size * 3))
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

    files = _image_files(data_dir)
    start = _clock()
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for row, path in enumerate(files):
        rgb = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        images[row] = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
    return {**_since(start), "images": len(files)}


def _forward_setup(backbone: str, weights: str, precision: str, batch_size: int, arrays_dir):
    """The compiled forward pass `extract` builds, and one real batch already in memory."""
    import numpy as np
    import tensorflow as tf

    from dogscats import arrays, features
    from dogscats.backbones import get_backbone

    spec = get_backbone(backbone)
    model = features.build_model(spec, weights, None, precision)  # exactly what extract() builds
    forward = features.make_forward(model, spec, batch_size, flip=False)
    images, _ = arrays.load_split(arrays_dir, "train")
    batch = np.zeros((batch_size, *images.shape[1:]), np.uint8)
    rows = min(batch_size, len(images))
    batch[:rows] = images[:rows]
    batch = tf.constant(batch)
    _time_forward(forward, batch, 2)  # trace and warm up: not part of the bare figure
    return forward, batch


def _time_forward(forward, batch, calls: int) -> list[float]:
    """Seconds of each of `calls` forward passes, each result fetched as extract() does."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        for output in forward(batch):
            output.numpy()
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


def _timed_extract(**kwargs) -> dict:
    """features.extract() timed: total seconds; seconds before its first forward call (the
    fixed cost: build the model, open the file, trace); seconds from each forward call to the
    next (one batch's whole cost: read, forward, write); seconds inside the forward calls.
    `make_forward` is wrapped only to take those stamps."""
    from dogscats import features

    real = features.make_forward
    calls: list[float] = []
    inside = [0.0]

    def stamped(*args, **kw):
        forward = real(*args, **kw)

        def call(batch):
            calls.append(time.perf_counter())
            outputs = forward(batch)  # eager on CPU: returns once computed
            inside[0] += time.perf_counter() - calls[-1]
            return outputs

        call.get_concrete_function = forward.get_concrete_function
        return call

    features.make_forward = stamped
    try:
        start = time.perf_counter()
        features.extract(progress=False, **kwargs)
        seconds = time.perf_counter() - start
    finally:
        features.make_forward = real
    batch_s = [later - earlier for earlier, later in zip(calls, calls[1:])]
    return {
        "seconds": seconds,
        "fixed_s": calls[0] - start,
        "batch_s": batch_s,
        "forward_s": inside[0],
    }


def task_features(
    data_dir: str, arrays_dir: str, backbone: str, weights: str, batch_size: int, out: str
) -> dict:
    """extract() end to end between two halves of the bare forward pass, so that a slow drift
    in the machine's load hits both alike. Medians per batch resist short bursts of load;
    CPU seconds (all threads of the process) resist load altogether."""
    images, calls = _forward_calls(arrays_dir, batch_size)
    forward, batch = _forward_setup(backbone, weights, "float32", batch_size, arrays_dir)
    cpu = time.process_time()
    bare = _time_forward(forward, batch, calls // 2)
    bare_cpu = time.process_time() - cpu
    cpu = time.process_time()
    pipeline = _timed_extract(
        data_dir=data_dir,
        backbone=backbone,
        weights=weights,
        batch_size=batch_size,
        arrays_dir=arrays_dir,
        out=out,
    )
    pipeline_cpu = time.process_time() - cpu
    cpu = time.process_time()
    bare += _time_forward(forward, batch, calls - calls // 2)
    bare_cpu += time.process_time() - cpu
    return {
        "images": images,
        "calls": calls,
        "pipeline_s": pipeline["seconds"],
        "fixed_s": pipeline["fixed_s"],
        "pipeline_forward_s": pipeline["forward_s"],
        "bare_s": sum(bare),
        "pipeline_batch_median_s": _median(pipeline["batch_s"]),
        "bare_batch_median_s": _median(bare),
        "pipeline_cpu_s": pipeline_cpu,
        "bare_cpu_s": bare_cpu,
    }


def task_extract(
    data_dir: str,
    arrays_dir: str,
    backbone: str,
    weights: str,
    batch_size: int,
    out: str,
    precision: str = "float32",
) -> dict:
    images, _ = _forward_calls(arrays_dir, batch_size)
    timed = _timed_extract(
        data_dir=data_dir,
        backbone=backbone,
        weights=weights,
        precision=precision,
        batch_size=batch_size,
        arrays_dir=arrays_dir,
        out=out,
    )
    return {"images": images, "seconds": timed["seconds"], "fixed_s": timed["fixed_s"]}


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
        result["extract"] = {}
        for precision, out in files.items():
            timed = _timed_extract(
                data_dir=data_dir,
                backbone=backbone,
                weights=weights,
                precision=precision,
                batch_size=batch_size,
                arrays_dir=arrays_dir,
                out=out,
            )
            result["extract"][precision] = {
                "seconds": timed["seconds"],
                "fixed_s": timed["fixed_s"],
                "batch_median_s": _median(timed["batch_s"]),
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


def _feature_difference(first: str, second: str) -> dict:
    """Largest and typical difference between two feature files of the same images."""
    import numpy as np

    from dogscats.features import load_features

    a = np.concatenate([load_features(first, s)["features"] for s in SPLITS])
    b = np.concatenate([load_features(second, s)["features"] for s in SPLITS])
    diff = np.abs(a - b)
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    return {
        "max_abs_diff": float(diff.max()),
        "max_abs_value": float(np.abs(a).max()),
        "mean_abs_diff": float(diff.mean()),
        "max_rel_l2": float(rel.max()),
        "mean_rel_l2": float(rel.mean()),
    }


def task_train_heads(files: dict[str, str], work: str, folds: int) -> dict:
    """Out-of-fold log loss of the logreg head (heads.train, as `make train` runs it) on each
    feature file."""
    from dogscats import heads

    result = {}
    for name, path in files.items():
        out = Path(work) / f"run-{name}"
        start = time.perf_counter()
        heads.train([path], out, head="logreg", n_folds=folds, log=lambda *_: None)
        seconds = time.perf_counter() - start
        metrics = json.loads((out / "metrics.json").read_text())
        result[name] = {
            "log_loss": metrics["log_loss"],
            "accuracy": metrics["accuracy"],
            "seconds": seconds,
        }
    return result


_TASKS: dict[str, Callable[..., dict]] = {
    "preprocess": task_preprocess,
    "bare_decode": task_bare_decode,
    "enlarge": task_enlarge,
    "seeds_loop": task_seeds_loop,
    "features": task_features,
    "extract": task_extract,
    "precision": task_precision,
    "train_heads": task_train_heads,
}


# ---------------------------------------------------------------------------------------------
# Datasets made of symlinks (never copies)


def _symlink_dataset(source: Path, target: Path, n_train: int, n_test: int) -> Path:
    """A Kaggle-layout folder of n_train (half cats, half dogs) and n_test links into `source`,
    cycling through its files when more are asked for than it holds."""
    train = sorted(os.listdir(source / "train"))
    pools = {a: [n for n in train if n.startswith(a + ".")] for a in ("cat", "dog")}
    tests = sorted(os.listdir(source / "test"))
    (target / "train").mkdir(parents=True)
    (target / "test").mkdir()
    for animal, names in pools.items():
        for k in range(n_train // 2):
            link = target / "train" / f"{animal}.{k}.jpg"
            link.symlink_to(source / "train" / names[k % len(names)])
    for k in range(n_test):
        (target / "test" / f"{k + 1}.jpg").symlink_to(source / "test" / tests[k % len(tests)])
    return target


def _linked_copy(source: Path, target: Path) -> Path:
    """The same dataset under another path (a new dataset key): folder-level symlinks."""
    target.mkdir(parents=True)
    for name in ("train", "test", "sample_submission.csv"):
        if (source / name).exists():
            (target / name).symlink_to(source / name)
    return target


def _warm_page_cache(data_dir: Path) -> None:
    """Read every image once so that no variant pays for the first read from disk."""
    for path in _image_files(str(data_dir)):
        Path(path).read_bytes()


def _sample_arrays(ctx: Context, size: int) -> Path:
    """Arrays of the whole sample at `size`, made once per run (not timed)."""
    if size not in ctx.arrays:
        out = ctx.work / f"arrays-{size}"
        _in_child(
            "preprocess",
            data_dir=str(ctx.data_dir),
            size=size,
            out_dir=str(out),
            workers=ctx.plan.workers,
        )
        ctx.arrays[size] = out
    return ctx.arrays[size]


# ---------------------------------------------------------------------------------------------
# Measurements: one function per figure, each returning a dict for the report


PREPROCESS_VARIANTS = ("pipeline", "bare", "bare_write", "seeds")


def _preprocess_variant(ctx: Context, data: Path, variant: str, keep: bool) -> dict:
    """One timed run of one variant on `data`, in its own process."""
    plan, common = ctx.plan, {"data_dir": str(data), "size": ctx.plan.size}
    if variant == "pipeline":
        out = ctx.work / f"arrays-{plan.size}-{time.monotonic_ns()}"
        result = _in_child("preprocess", out_dir=str(out), workers=plan.workers, **common)
        if keep and plan.size not in ctx.arrays:
            ctx.arrays[plan.size] = out  # the whole data set's arrays: later stages reuse them
        else:
            shutil.rmtree(out)
        return result
    if variant == "bare":
        return _in_child("bare_decode", workers=plan.workers, **common)
    if variant == "bare_write":
        out = str(ctx.work / "bare-write.bin")
        return _in_child("bare_decode", workers=plan.workers, out=out, **common)
    return _in_child("seeds_loop", **common)


def _preprocess_scale(ctx: Context, data: Path, keep: bool) -> dict:
    """All variants on one data set, interleaved in rotating order `repeats` times; the best
    run of each counts."""
    _warm_page_cache(data)
    runs: dict[str, list[dict]] = {variant: [] for variant in PREPROCESS_VARIANTS}
    for rep in range(ctx.plan.repeats):
        shift = rep % len(PREPROCESS_VARIANTS)
        for variant in PREPROCESS_VARIANTS[shift:] + PREPROCESS_VARIANTS[:shift]:
            os.sync()  # untimed: no variant pays for writing back the previous one's output
            runs[variant].append(_preprocess_variant(ctx, data, variant, keep))
    best = {variant: min(r, key=lambda x: x["seconds"]) for variant, r in runs.items()}
    images = best["pipeline"]["images"]
    seconds = {variant: result["seconds"] for variant, result in best.items()}
    return {
        "images": images,
        "runs": {variant: [r["seconds"] for r in results] for variant, results in runs.items()},
        "best": seconds,
        "cpu": {variant: result["cpu_s"] for variant, result in best.items()},
        "fsync_s": best["pipeline"]["fsync_s"],
        "rate": {variant: images / s for variant, s in seconds.items()},
        "vs_bare": seconds["bare"] / seconds["pipeline"],
        "vs_bare_write": seconds["bare_write"] / seconds["pipeline"],
        "vs_seeds": seconds["seeds"] / seconds["pipeline"],
    }


def measure_preprocess(ctx: Context) -> dict:
    """The pipeline against the bare parallel loop (also with the writes) and the seeds' loop,
    on the data set; on k times as many symlinks to it, where fixed start-up costs weigh as
    little as on the 37,500 images of the competition; and on the same images enlarged to
    the competition's usual size, whose decoding costs what the real images' does."""
    counts = {split: len(os.listdir(ctx.data_dir / split)) for split in SPLITS}
    scales = {}
    for factor in ctx.plan.preprocess_scales:
        data = ctx.data_dir
        if factor > 1:
            data = ctx.work / f"preprocess-{factor}x" / "data"
            _symlink_dataset(ctx.data_dir, data, factor * counts["train"], factor * counts["test"])
        scales[f"{factor}x"] = _preprocess_scale(ctx, data, keep=factor == 1)
        if factor > 1:
            shutil.rmtree(data.parent)
        print(f"  {factor}x: pipeline / bare = {scales[f'{factor}x']['vs_bare']:.3f}", flush=True)
    if ctx.plan.enlarged:
        width, height = ctx.plan.enlarged
        data = ctx.work / "preprocess-enlarged" / "data"
        made = _in_child(
            "enlarge", source=str(ctx.data_dir), target=str(data), width=width, height=height
        )
        name = f"{width}x{height}"
        scales[name] = {**_preprocess_scale(ctx, data, keep=False), "enlarged": made}
        shutil.rmtree(data.parent)
        print(f"  {name}: pipeline / bare = {scales[name]['vs_bare']:.3f}", flush=True)
    return {"workers": ctx.plan.workers, "size": ctx.plan.size, "scales": scales}


def _feature_runs(ctx: Context, backbone: str, arrays_dir: Path) -> list[dict]:
    """Pipeline-and-bare runs of one backbone, each in a fresh process: up to
    `feature_repeats`, while `feature_budget_s` lasts (a slow backbone gets one)."""
    runs: list[dict] = []
    start = time.perf_counter()
    while len(runs) < ctx.plan.feature_repeats and (
        not runs or time.perf_counter() - start < ctx.plan.feature_budget_s
    ):
        out = ctx.work / f"{backbone}.bench.h5"
        runs.append(
            _in_child(
                "features",
                data_dir=str(ctx.data_dir),
                arrays_dir=str(arrays_dir),
                backbone=backbone,
                weights="random",
                batch_size=ctx.plan.batch_size,
                out=str(out),
            )
        )
        out.unlink(missing_ok=True)
    return runs


def measure_features(ctx: Context) -> dict:
    """extract() vs the bare forward pass of the same compiled model, per backbone. With
    several runs, the best pipeline time and the best bare time count, each from its own run,
    as in preprocessing; the load-robust figures come from the run with the best pipeline."""
    from dogscats.backbones import get_backbone  # stdlib-only module

    rows = {}
    for backbone in ctx.plan.backbones:
        arrays_dir = _sample_arrays(ctx, get_backbone(backbone).input_size)
        runs = _feature_runs(ctx, backbone, arrays_dir)
        best = min(runs, key=lambda r: r["pipeline_s"])
        bare_s = min(r["bare_s"] for r in runs)
        images = best["images"]
        streaming = best["pipeline_s"] - best["fixed_s"]
        rows[backbone] = {
            **best,
            "runs": len(runs),
            "pipeline_runs_s": [r["pipeline_s"] for r in runs],
            "bare_runs_s": [r["bare_s"] for r in runs],
            "bare_s": bare_s,
            "pipeline_rate": images / best["pipeline_s"],
            "bare_rate": images / bare_s,
            "ratio": bare_s / best["pipeline_s"],
            "streaming_ratio": bare_s / streaming,
            "forward_share": best["pipeline_forward_s"] / streaming,
            "cpu_ratio": best["bare_cpu_s"] / best["pipeline_cpu_s"],
        }
        print(f"  {backbone}: pipeline/bare = {rows[backbone]['ratio']:.3f}", flush=True)
    return {"batch_size": ctx.plan.batch_size, "weights": "random", "backbones": rows}


def measure_scaling(ctx: Context) -> dict:
    """Peak memory and seconds per image of both stages on N and on 4N train images."""
    from dogscats.backbones import get_backbone

    plan = ctx.plan
    backbone = plan.growth_backbone
    size = get_backbone(backbone).input_size
    points = {}
    for factor in (1, 4):
        root = ctx.work / f"scale-{factor}N"
        n_train = factor * plan.n_small
        data = _symlink_dataset(ctx.data_dir, root / "data", n_train, n_train // 2)
        arrays_dir = root / "arrays"
        pre = _in_child(
            "preprocess",
            sample_memory=True,
            data_dir=str(data),
            size=size,
            out_dir=str(arrays_dir),
            workers=plan.workers,
        )
        feat = _in_child(
            "extract",
            sample_memory=True,
            data_dir=str(data),
            arrays_dir=str(arrays_dir),
            backbone=backbone,
            weights="random",
            batch_size=plan.batch_size,
            out=str(root / "features.h5"),
        )
        points[f"{factor}N"] = {
            "train": n_train,
            "test": n_train // 2,
            "preprocess": pre,
            "features": feat,
        }
        shutil.rmtree(root)
        print(f"  {factor}N done", flush=True)
    return {"n": plan.n_small, "backbone": backbone, "size": size, "points": points}


def _clean_make_env(**extra: str) -> dict[str, str]:
    """The environment of a top-level `make`: nothing inherited from an outer `make bench`."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return {**env, **extra}


def _make(target: str, args: list[str], env: dict[str, str]) -> tuple[float, str, str]:
    start = time.perf_counter()
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(config.PROJECT_ROOT), target, *args],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(
            f"make {target} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return seconds, result.stdout, result.stderr


def _imports(stderr: str) -> tuple[int, list[str]]:
    """(python processes, modules imported) from PYTHONPROFILEIMPORTTIME output."""
    lines = [line for line in stderr.splitlines() if line.startswith("import time:")]
    processes = sum("imported package" in line for line in lines)
    modules = [line.rsplit("|", 1)[1].strip() for line in lines if "imported package" not in line]
    return processes, modules


def measure_submission(ctx: Context) -> dict:
    """`make submission` cold (stage by stage, fresh dataset key and KERAS_HOME) and warm."""
    plan = ctx.plan
    root = ctx.work / "submission"
    data = _linked_copy(ctx.data_dir, root / ctx.data_dir.name)  # new key: nothing reused
    args = [f"DATA_DIR={data}", f"BACKBONES={plan.submission_backbones}", "TTA=flip"]
    args += list(plan.submission_args)
    outputs = [config.dataset_dir(data), config.submissions_dir(data)]
    cold_env = _clean_make_env(KERAS_HOME=str(root / "keras-home"))
    try:
        cold = {}
        for target in ("preprocess", "features", "train", "submission"):
            cold[target] = _make(target, args, cold_env)[0]
            print(f"  cold make {target}: {cold[target]:.1f} s", flush=True)
        metrics = next(config.dataset_dir(data).glob("models/*/metrics.json"))
        oof = json.loads(metrics.read_text())
        warm_s, stdout, stderr = _make(
            "submission", args, _clean_make_env(PYTHONPROFILEIMPORTTIME="1")
        )
    finally:
        for path in outputs:  # this run's own dataset key: nothing anyone else made
            shutil.rmtree(path, ignore_errors=True)
    processes, modules = _imports(stderr)
    heavy = sorted({m for m in modules if m.split(".")[0] in _TF_MODULES})
    return {
        "command": "make submission " + " ".join(args),
        "outputs": [str(path) for path in outputs],
        "cold": cold,
        "cold_total": sum(cold.values()),
        "oof_log_loss": oof["log_loss"],
        "oof_accuracy": oof["accuracy"],
        "warm_s": warm_s,
        "warm_output": stdout.strip(),
        "warm_up_to_date": "nothing to redo" in stdout,
        "warm_pythons": processes,
        "warm_modules": len(modules),
        "warm_heavy_modules": heavy,
    }


def measure_precision(ctx: Context) -> dict:
    """bfloat16 against float32: extraction speed, feature difference, out-of-fold log loss."""
    from dogscats.backbones import get_backbone

    plan = ctx.plan
    first = plan.precision_backbones[0]
    bare, main = {}, {}
    for backbone in plan.precision_backbones:
        result = _in_child(
            "precision",
            data_dir=str(ctx.data_dir),
            arrays_dir=str(_sample_arrays(ctx, get_backbone(backbone).input_size)),
            backbone=backbone,
            weights=plan.precision_weights if backbone == first else "random",
            batch_size=plan.batch_size,
            rounds=plan.precision_rounds,
            calls=plan.precision_calls,
            work=str(ctx.work) if backbone == first else None,
        )
        bare[backbone] = result["bare"]
        main = main or result
    heads = _in_child("train_heads", files=main["files"], work=str(ctx.work), folds=plan.folds)
    extract = main["extract"]
    speedup = extract["float32"]["seconds"] / extract["bfloat16"]["seconds"]
    # The verdict goes by the median batch: the end-to-end pair ran one after the other, so a
    # burst of load on a shared machine could favour either.
    median_speedup = extract["float32"]["batch_median_s"] / extract["bfloat16"]["batch_median_s"]
    loss_change = heads["bfloat16"]["log_loss"] - heads["float32"]["log_loss"]
    speedups = {
        name: b["seconds"]["float32"] / b["seconds"]["bfloat16"] for name, b in bare.items()
    }
    speedups[first] = median_speedup  # the extraction itself, for the backbone with real weights
    return {
        "backbone": first,
        "weights": plan.precision_weights,
        "folds": plan.folds,
        "extract": extract,
        "speedup": speedup,
        "median_speedup": median_speedup,
        "speedups": speedups,
        "diff": main["diff"],
        "heads": heads,
        "loss_change": loss_change,
        "bare": bare,
        "recommend_default": all(x > 1 for x in speedups.values()) and loss_change <= 0,
    }


MEASUREMENTS: dict[str, Callable[[Context], dict]] = {
    "preprocess": measure_preprocess,
    "features": measure_features,
    "scaling": measure_scaling,
    "submission": measure_submission,
    "precision": measure_precision,
}


# ---------------------------------------------------------------------------------------------
# Report


def _machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    total = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    return {
        "CPU": f"{model.group(1) if model else platform.processor()}, {os.cpu_count()} cores"
        f" (avx512_bf16: {'yes' if 'avx512_bf16' in cpuinfo else 'no'})",
        "Memory": f"{int(total.group(1)) / 1024**2:.1f} GB" if total else "?",
        "OS": platform.platform(),
    }


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in (
        "tensorflow",
        "keras",
        "numpy",
        "opencv-python-headless",
        "h5py",
        "scikit-learn",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    commit = subprocess.run(
        ["git", "-C", str(config.PROJECT_ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    )
    versions["git"] = commit.stdout.strip() or "?"
    return versions


def _yes(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target of issue #5 whose stage ran."""
    rows = []
    for scale, pre in results.get("preprocess", {}).get("scales", {}).items():
        n = f"preprocess ({pre['images']} images, {scale})"
        ratio, speedup = pre["vs_bare"], pre["vs_seeds"]
        rows.append((f"{n} >= 0.85 x bare parallel loop", f"{ratio:.3f}", ratio >= 0.85))
        rows.append((f"{n} >= 1.8 x seeds' single loop", f"{speedup:.2f}x", speedup >= 1.8))
    for name, b in results.get("features", {}).get("backbones", {}).items():
        measured = (
            f"{b['ratio']:.3f} (streaming {b['streaming_ratio']:.3f}; in forward "
            f"{b['forward_share']:.3f}; CPU {b['cpu_ratio']:.3f})"
        )
        rows.append((f"features {name} >= 0.90 x bare forward", measured, b["ratio"] >= 0.90))
    points = results.get("scaling", {}).get("points", {})
    for stage in ("preprocess", "features") if points else ():
        small, large = _peak_mb(points["1N"][stage]), _peak_mb(points["4N"][stage])
        rows.append(
            (f"{stage} peak RSS 4N within 15% of N", f"{large / small:.3f}", large <= 1.15 * small)
        )
        a, b = _per_image(points["1N"], stage), _per_image(points["4N"], stage)
        rows.append((f"{stage} s/image 4N within 10% of N", f"{b / a:.3f}", b <= 1.10 * a))
    if points:
        peak = max(_peak_mb(point["preprocess"]) for point in points.values())
        rows.append(("preprocess peak RSS < 1.5 GB", f"{peak:.0f} MB", peak < 1536))
    sub = results.get("submission", {})
    if "warm_s" in sub:
        heavy = ", ".join(sub["warm_heavy_modules"]) or "none"
        measured = f"{sub['warm_s']:.2f} s; {sub['warm_pythons']} python; heavy imports: {heavy}"
        ok = sub["warm_s"] < 3 and not sub["warm_heavy_modules"] and sub["warm_up_to_date"]
        rows.append(("warm make submission < 3 s, no TensorFlow", measured, ok))
    return rows


def _peak_mb(result: dict) -> float:
    """The peak the targets use, on the safe side: the summed RSS of the stage's process tree
    (shared libraries counted once per process), or the largest single process when that is
    higher (sampling can miss a short spike)."""
    return max(result.get("tree_rss_mb", 0.0), result["rss_self_mb"], result["rss_children_mb"])


def _per_image(point: dict, stage: str) -> float:
    return point[stage]["seconds"] / point[stage]["images"]


def _table(header: str, rows: list[str]) -> list[str]:
    """Markdown table from 'a | b' strings."""
    width = header.count("|") + 1
    return [f"| {header} |", "|" + "---|" * width, *(f"| {row} |" for row in rows)]


def _preprocess_intro(r: dict) -> list[str]:
    """What the data sets are, and how much dearer the enlarged images are to decode."""
    text = (
        "All images of the data set (train + test; '1x'), and a set of k times as many "
        "symlinks to them ('kx'), on which fixed start-up costs weigh about as little as on the "
        "competition's 37,500 images."
    )
    scales = r["scales"]
    for name, p in scales.items():
        if "enlarged" not in p or "1x" not in scales:
            continue
        per_image = {k: scales[k]["cpu"]["bare"] / scales[k]["images"] for k in ("1x", name)}
        text += (
            f" Synthetic: the same images enlarged to {name}, the size of most competition "
            f"photos, saved as JPEG (quality {p['enlarged']['quality']}, "
            f"{p['enlarged']['mean_kb']:.0f} kB a file) in /tmp: the bare loop's CPU per image "
            f"is {per_image[name] / per_image['1x']:.1f}x that of the 200x200 sample, so "
            "writing each result weighs that much less against decoding it."
        )
    return [text + f" Output: {r['size']}x{r['size']}x3 uint8 per image.", ""]


def _section_preprocess(r: dict) -> list[str]:
    w = r["workers"]
    names = {
        "pipeline": (
            f"`arrays.preprocess`: {w} workers, pwrite of 1 MB runs of rows into the "
            "preallocated .npy, flushed to disk while decoding, fsync, rename"
        ),
        "bare": f"bare loop: imread, cvtColor, resize, result discarded; {w} processes",
        "bare_write": (
            f"bare loop + pwrite of the results in 1 MB runs into one preallocated file, "
            f"fsync at the end; {w} processes"
        ),
        "seeds": "seeds' loop: 1 process filling an in-RAM array",
    }
    rows, notes = [], []
    for scale, p in r["scales"].items():
        for key, name in names.items():
            runs = ", ".join(f"{s:.2f}" for s in p["runs"][key])
            ratio = p["rate"]["pipeline"] / p["rate"][key]
            rows.append(
                f"{p['images']} ({scale}) | {name} | {p['best'][key]:.2f} | "
                f"{p['rate'][key]:.0f} | {ratio:.3f} | {p['cpu'][key]:.2f} | {runs}"
            )
        notes.append(
            f"{p['images']} ({scale}): pipeline / bare parallel loop **{p['vs_bare']:.3f}**; / "
            f"bare loop that also writes **{p['vs_bare_write']:.3f}**; / seeds' single loop "
            f"**{p['vs_seeds']:.2f}x**; waiting for fsync took {p['fsync_s']:.2f} s of the "
            f"pipeline's best run ({p['fsync_s'] / p['best']['pipeline']:.0%})."
        )
    header = (
        "images | variant | best s | images/s | pipeline / variant | CPU s (best run) | "
        "all runs (s)"
    )
    return [
        *_preprocess_intro(r),
        "Each variant in a fresh "
        "process, timed from the call (pool start-up included, interpreter start-up not); "
        "variants interleaved in rotating order, the best run counts; image files read once "
        "beforehand, so every variant finds them in the page cache, and `os.sync()` before "
        "each run, so none pays for writing back the previous run's output. Pools fork, as the "
        "pipeline's does. CPU s: user + system time of the process and its workers, which the "
        "load of a shared machine barely changes.",
        "",
        *_table(header, rows),
        "",
        *[f"- {note}" for note in notes],
    ]


def _section_features(r: dict) -> list[str]:
    rows = []
    for name, b in r["backbones"].items():
        runs = ", ".join(
            f"{p:.1f}/{q:.1f}" for p, q in zip(b["pipeline_runs_s"], b["bare_runs_s"])
        )
        rows.append(
            f"{name} | {b['images']} | {b['pipeline_rate']:.1f} | {b['bare_rate']:.1f} | "
            f"**{b['ratio']:.3f}** | {b['streaming_ratio']:.3f} | {b['forward_share']:.3f} | "
            f"{b['cpu_ratio']:.3f} | {b['fixed_s']:.1f} | {runs}"
        )
    header = (
        "backbone | images | pipeline img/s | bare img/s | pipeline / bare | streaming / bare | "
        "in forward | CPU | fixed s | runs: pipeline/bare s"
    )
    return [
        f"`features.extract` (memmap arrays -> tf.data -> forward -> .h5; batch "
        f"{r['batch_size']}; {r['weights']} weights) against the same compiled forward pass "
        "called on one batch already in memory, as many calls as the extraction makes. Both in "
        "one process: half the bare calls before the extraction, half after, so that a slow "
        "drift in the machine's load hits both alike; a fast backbone gets several such runs "
        "(fresh processes) and the best pipeline and best bare time count. Ratios are bare / "
        "pipeline (1 = no overhead): 'pipeline / bare' end to end, the target's figure; "
        "'streaming' without the fixed cost before the first batch ('fixed s': build the model, "
        "trace, open the file), which does not grow with the data. Robust to the load of a "
        "shared machine, from the best pipeline run: 'in forward', the share of the "
        "extraction's streaming time spent inside its forward calls (1 - it is the pipeline's "
        "own overhead), and 'CPU', CPU seconds of all threads, bare / pipeline (the "
        "pipeline's include the fixed cost).",
        "",
        *_table(header, rows),
    ]


def _section_memory(r: dict) -> list[str]:
    rows = []
    for stage in ("preprocess", "features"):
        for label in ("1N", "4N"):
            point, m = r["points"][label], r["points"][label][stage]
            rows.append(
                f"{stage} | {label} | {point['train'] + point['test']} | {m['rss_self_mb']:.0f} | "
                f"{m['rss_children_mb']:.0f} | {m.get('tree_rss_mb', 0):.0f} | "
                f"{m.get('tree_pss_mb', 0):.0f} | {_peak_mb(m):.0f}"
            )
        ratio = _peak_mb(r["points"]["4N"][stage]) / _peak_mb(r["points"]["1N"][stage])
        rows.append(f"{stage} | 4N / N | | | | | | **{ratio:.3f}**")
    header = (
        "stage | size | images | main MB | largest child MB | tree RSS MB | tree PSS MB | peak MB"
    )
    return [
        f"N = {r['n']} train + {r['n'] // 2} test images, 4N = {4 * r['n']} + {2 * r['n']}: "
        f"symlinks into the data set (cycled), never copies. Features: {r['backbone']} (random "
        f"weights), {r['size']}px. Each stage in its own process. 'main': that process's peak "
        "RSS (kernel ru_maxrss, exact). 'largest child': its RUSAGE_CHILDREN peak, i.e. the "
        "largest single pool worker, not a sum. 'tree RSS' / 'tree PSS': peaks of the RSS and "
        "of the PSS summed over the whole process tree, sampled every 0.1 s; RSS counts shared "
        "libraries once per process (too high for a pool), PSS divides shared pages among all "
        "processes that map them, other users' included (can be too low). 'peak': the largest "
        "of main, largest child and tree RSS; the targets use it.",
        "",
        *_table(header, rows),
    ]


def _section_growth(r: dict) -> list[str]:
    rows = []
    for stage in ("preprocess", "features"):
        small, large = r["points"]["1N"][stage], r["points"]["4N"][stage]
        a, b = small["seconds"] / small["images"], large["seconds"] / large["images"]
        marginal = (large["seconds"] - small["seconds"]) / (large["images"] - small["images"])
        rows.append(
            f"{stage} | {small['seconds']:.2f} | {large['seconds']:.2f} | {a * 1e3:.3f} | "
            f"{b * 1e3:.3f} | **{b / a:.3f}** | {marginal * 1e3:.3f}"
        )
    header = "stage | s at N | s at 4N | ms/image N | ms/image 4N | 4N / N | marginal ms/image"
    return [
        "The runs of the memory table: seconds of the stage call (its fixed start-up included) "
        "over all its images. 'marginal' is (T(4N) - T(N)) / (images(4N) - images(N)), the cost "
        "of one more image with the fixed part taken out.",
        "",
        *_table(header, rows),
    ]


def _section_submission(r: dict) -> list[str]:
    rows = [f"cold `make {target}` | {seconds:.1f}" for target, seconds in r["cold"].items()]
    rows += [f"**cold total** | **{r['cold_total']:.1f}**", f"**warm** | **{r['warm_s']:.2f}**"]
    heavy = ", ".join(r["warm_heavy_modules"]) or "none"
    return [
        f"`{r['command']}`. DATA_DIR is a /tmp folder of symlinks to the data, so it has a "
        "dataset key of its own and nothing is reused; its outputs are removed afterwards. Cold: "
        "the four targets in turn, with a fresh, empty KERAS_HOME (no converted weights cached "
        "either); image files may be in the page cache. Warm: the same `make submission` again.",
        "",
        *_table("step | seconds", rows),
        "",
        f"Cold run's out-of-fold log loss {r['oof_log_loss']:.5f}, accuracy "
        f"{r['oof_accuracy']:.4f}.",
        "",
        f"Warm run's output: `{r['warm_output']}`. Run with PYTHONPROFILEIMPORTTIME=1, so every "
        "Python started (make's parse-time registry call included) lists each module it "
        f"imports: {r['warm_pythons']} Python process(es), {r['warm_modules']} modules; of "
        f"{', '.join(_TF_MODULES)}: **{heavy}**.",
    ]


def _precision_verdict(r: dict) -> str:
    """Default only if faster for every backbone measured and the log loss is not worse."""
    faster = [f"{n} {x:.2f}x" for n, x in r["speedups"].items() if x > 1]
    slower = [f"{n} {x:.2f}x" for n, x in r["speedups"].items() if x <= 1]
    worse = "worse" if r["loss_change"] > 0 else "not worse"
    loss = f"out-of-fold log loss {r['loss_change']:+.5f} on {r['backbone']}, {worse}"
    if r["recommend_default"]:
        return f"bfloat16 is faster for every backbone ({', '.join(faster)}), {loss}: default it."
    if faster:
        return (
            f"Keep float32 the default: bfloat16 is slower for {', '.join(slower) or 'none'} "
            f"and faster for {', '.join(faster)} ({loss}). Keep PRECISION=bfloat16 as the "
            "option for the backbones it speeds up."
        )
    return f"bfloat16 is faster for no backbone here ({', '.join(slower)}): keep float32."


def _section_precision(r: dict) -> list[str]:
    e, h, d = r["extract"], r["heads"], r["diff"]
    f32, bf16 = e["float32"]["seconds"], e["bfloat16"]["seconds"]
    m32, m16 = e["float32"]["batch_median_s"], e["bfloat16"]["batch_median_s"]
    rows = [
        f"extraction s (end to end) | {f32:.1f} | {bf16:.1f} | {r['speedup']:.2f}x",
        f"extraction, median s per batch | {m32:.3f} | {m16:.3f} | {m32 / m16:.2f}x",
    ]
    for name, b in r["bare"].items():
        s = b["seconds"]
        rows.append(
            f"bare forward s, {name} ({b['images']} images, alternated) | {s['float32']:.2f} | "
            f"{s['bfloat16']:.2f} | {s['float32'] / s['bfloat16']:.2f}x"
        )
    h32, h16 = h["float32"], h["bfloat16"]
    rows.append(
        f"out-of-fold log loss (logreg) | {h32['log_loss']:.5f} | {h16['log_loss']:.5f} | "
        f"{r['loss_change']:+.5f}"
    )
    rows.append(f"out-of-fold accuracy | {h32['accuracy']:.4f} | {h16['accuracy']:.4f} |")
    verdict = _precision_verdict(r)
    return [
        f"{r['backbone']} ({r['weights']} weights) on the whole data set, TTA none, extracted "
        "once in each precision (bfloat16: Keras mixed_bfloat16 compute, features stored as "
        f"float32); the logreg head (heads.train, {r['folds']} folds) trained on each file. "
        "Other backbones: bare forward speed only, random weights (no ImageNet weights for "
        "them on this offline machine).",
        "",
        *_table(" | float32 | bfloat16 | speed-up / change", rows),
        "",
        f"Largest feature difference: {d['max_abs_diff']:.4g} (largest feature value "
        f"{d['max_abs_value']:.4g}; mean absolute difference {d['mean_abs_diff']:.3g}; "
        f"per-image relative L2 error: mean {d['mean_rel_l2']:.3g}, max {d['max_rel_l2']:.3g}).",
        "",
        f"**{verdict}**",
    ]


SECTIONS: list[tuple[str, str, Callable[[dict], list[str]]]] = [
    ("1. Preprocessing", "preprocess", _section_preprocess),
    ("2. Feature extraction", "features", _section_features),
    ("3. Memory: peak RSS on N and 4N", "scaling", _section_memory),
    ("4. Cost growth: seconds per image on N and 4N", "scaling", _section_growth),
    ("5. make submission, cold and warm", "submission", _section_submission),
    ("6. Precision: bfloat16 against float32", "precision", _section_precision),
]


def render(results: dict, meta: dict) -> str:
    lines = [
        "# Benchmark: the pipeline against its bare parts",
        "",
        f"Written by `{meta['command']}` on {meta['date']}; took {meta['minutes']:.1f} min. "
        "Ratios compare figures measured in this same run.",
        "",
        f"Data: `{meta['data_dir']}` ({meta['images']}). {meta['sizes']}",
        "",
        "## Machine and versions",
        "",
        *_table(" | ", [f"{k} | {v}" for k, v in meta["machine"].items()]),
        "",
        "## Targets",
        "",
        *_table(
            "target | measured | ", [f"{t} | {m} | {_yes(ok)}" for t, m, ok in targets(results)]
        ),
    ]
    for title, stage, section in SECTIONS:
        if stage not in results:
            continue
        lines += ["", f"## {title}", ""]
        if "error" in results[stage]:
            lines.append(f"**Failed:** `{results[stage]['error']}`")
        else:
            lines += section(results[stage])
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Entry point


def _check_stages(stages: list[str] | None) -> list[str]:
    chosen = list(stages) if stages else list(STAGES)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise ValueError(f"Unknown bench stage(s) {unknown}. Valid: {', '.join(STAGES)}.")
    return [s for s in STAGES if s in chosen]


def _count_images(data_dir: Path) -> str:
    counts = {split: len(os.listdir(data_dir / split)) for split in SPLITS}
    return f"{counts['train']} train + {counts['test']} test images"


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)

    def minutes(self) -> float:
        return (time.perf_counter() - self.start) / 60


def _command(data_dir: Path, out: Path, quick: bool, stages: list[str] | None) -> str:
    command = f"python -m dogscats.cli bench --data-dir {data_dir} --out {out}"
    command += " --quick" * quick + (f" --stages {' '.join(stages)}" if stages else "")
    return ("make bench: " if os.environ.get("MAKELEVEL") else "") + command


def _stage_results(ctx: Context, chosen: list[str]) -> Iterator[tuple[str, dict]]:
    for stage in chosen:
        print(f"bench: {stage} ...", flush=True)
        clock = _Clock()
        try:
            result = MEASUREMENTS[stage](ctx)
        except Exception as error:  # one failed stage still leaves the others' figures
            result = {"error": f"{type(error).__name__}: {error}"}
        print(f"bench: {stage} took {clock.minutes():.1f} min", flush=True)
        yield stage, result


def run(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    quick: bool = False,
    stages: list[str] | None = None,
) -> dict:
    """Measure the chosen stages (all by default), write the report to `out`, return results.

    Raises RuntimeError after writing the report when a stage failed.
    """
    data_dir, out = Path(os.path.abspath(os.fspath(data_dir))), Path(out)
    chosen = _check_stages(stages)
    plan = QUICK if quick else Plan()
    if quick:
        plan = replace(plan, workers=min(plan.workers, 2))
    clock = _Clock()
    meta = {
        "command": _command(data_dir, out, quick, stages),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "data_dir": str(data_dir),
        "images": _count_images(data_dir),
        "sizes": _sizes_text(plan),
        "machine": {**_machine(), **_versions()},
    }
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="dogscats-bench-"))
    try:
        ctx = Context(data_dir, work, plan)
        results = dict(_stage_results(ctx, chosen))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    meta["machine"]["Load average (1/5/15 min), start -> end"] = (
        f"{'/'.join(f'{x:.1f}' for x in load_before)} -> "
        f"{'/'.join(f'{x:.1f}' for x in load_after)}"
    )
    meta["minutes"] = clock.minutes()
    _write_atomically(out, render(results, meta))
    print(f"bench: wrote {out}", flush=True)
    failed = {stage: r["error"] for stage, r in results.items() if "error" in r}
    if failed:
        raise RuntimeError(f"bench stages failed (see {out}): {failed}")
    return results


def _sizes_text(plan: Plan) -> str:
    return (
        f"Throughput on the whole data set; memory and growth on N = {plan.n_small} and "
        f"4N = {4 * plan.n_small} train images. Workers: {plan.workers}; batch size "
        f"{plan.batch_size}; preprocessing variants best of {plan.repeats}."
    )
