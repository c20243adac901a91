"""The measurements: one function per stage, each returning a dict for the report.

Runs in the parent, which imports the standard library (and the stdlib-only dogscats.config and
dogscats.backbones) only; the work itself runs in child processes (child.in_child), and the
stages that belong to the command line (train, make) run through it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from child import in_child
from plan import Context, linked_copy, symlink_dataset
from tasks import SPLITS, image_files

from dogscats import config

TF_MODULES = ("tensorflow", "keras", "numpy", "h5py")  # none may load in a warm `make`


# ---------------------------------------------------------------------------------------------
# Shared inputs


def _warm_page_cache(data_dir: Path) -> None:
    """Read every image once so that no variant pays for the first read from disk."""
    for path in image_files(str(data_dir)):
        Path(path).read_bytes()


def _sample_arrays(ctx: Context, size: int) -> Path:
    """Arrays of the whole sample at `size`, made once per run (not timed)."""
    if size not in ctx.arrays:
        out = ctx.work / f"arrays-{size}"
        in_child(
            "preprocess",
            data_dir=str(ctx.data_dir),
            size=size,
            out_dir=str(out),
            workers=ctx.plan.workers,
        )
        ctx.arrays[size] = out
    return ctx.arrays[size]


def _input_size(backbone: str) -> int:
    from dogscats.backbones import get_backbone  # stdlib-only module

    return get_backbone(backbone).input_size


# ---------------------------------------------------------------------------------------------
# 1. Preprocessing


PREPROCESS_VARIANTS = ("pipeline", "bare", "bare_write", "seeds")


def _preprocess_variant(ctx: Context, data: Path, variant: str, keep: bool) -> dict:
    """One timed run of one variant on `data`, in its own process."""
    plan, common = ctx.plan, {"data_dir": str(data), "size": ctx.plan.size}
    if variant == "pipeline":
        out = ctx.work / f"arrays-{plan.size}-{time.monotonic_ns()}"
        result = in_child("preprocess", out_dir=str(out), workers=plan.workers, **common)
        if keep and plan.size not in ctx.arrays:
            ctx.arrays[plan.size] = out  # the whole data set's arrays: later stages reuse them
        else:
            shutil.rmtree(out)
        return result
    if variant == "bare":
        return in_child("bare_decode", workers=plan.workers, **common)
    if variant == "bare_write":
        out = str(ctx.work / "bare-write.bin")
        return in_child("bare_decode", workers=plan.workers, out=out, **common)
    return in_child("seeds_loop", **common)


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
            symlink_dataset(ctx.data_dir, data, factor * counts["train"], factor * counts["test"])
        scales[f"{factor}x"] = _preprocess_scale(ctx, data, keep=factor == 1)
        if factor > 1:
            shutil.rmtree(data.parent)
        print(f"  {factor}x: pipeline / bare = {scales[f'{factor}x']['vs_bare']:.3f}", flush=True)
    if ctx.plan.enlarged:
        width, height = ctx.plan.enlarged
        data = ctx.work / "preprocess-enlarged" / "data"
        made = in_child(
            "enlarge", source=str(ctx.data_dir), target=str(data), width=width, height=height
        )
        name = f"{width}x{height}"
        scales[name] = {**_preprocess_scale(ctx, data, keep=False), "enlarged": made}
        shutil.rmtree(data.parent)
        print(f"  {name}: pipeline / bare = {scales[name]['vs_bare']:.3f}", flush=True)
    return {"workers": ctx.plan.workers, "size": ctx.plan.size, "scales": scales}


# ---------------------------------------------------------------------------------------------
# 2. Feature extraction


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
            in_child(
                "features",
                data_dir=str(ctx.data_dir),
                arrays_dir=str(arrays_dir),
                backbone=backbone,
                weights="random",
                batch_size=ctx.plan.batch_size,
                out=str(out),
                precision=ctx.plan.feature_precision,
                tta=ctx.plan.feature_tta,
            )
        )
        out.unlink(missing_ok=True)
    return runs


def measure_features(ctx: Context) -> dict:
    """extract() vs the bare forward pass of the same compiled model, per backbone. With
    several runs, the best pipeline time and the best bare time count, each from its own run,
    as in preprocessing; the load-robust CPU figure comes from the run with the best pipeline."""
    rows = {}
    for backbone in ctx.plan.backbones:
        arrays_dir = _sample_arrays(ctx, _input_size(backbone))
        runs = _feature_runs(ctx, backbone, arrays_dir)
        best = min(runs, key=lambda r: r["pipeline_s"])
        bare_s = min(r["bare_s"] for r in runs)
        images = best["images"]
        # The fixed cost is timed apart: under load it can exceed a small run's whole time,
        # and then the streaming part is not measurable (None, "n/a" in the report).
        streaming_s = best["pipeline_s"] - best["fixed_s"]
        rows[backbone] = {
            **best,
            "runs": len(runs),
            "pipeline_runs_s": [r["pipeline_s"] for r in runs],
            "bare_runs_s": [r["bare_s"] for r in runs],
            "bare_s": bare_s,
            "pipeline_rate": images / best["pipeline_s"],
            "bare_rate": images / bare_s,
            "ratio": bare_s / best["pipeline_s"],
            "streaming_ratio": bare_s / streaming_s if streaming_s > 0 else None,
            "cpu_ratio": best["bare_cpu_s"] / best["pipeline_cpu_s"],
            "row_check": _row_check_cost(arrays_dir, ctx.plan.batch_size, best["pipeline_s"]),
        }
        print(f"  {backbone}: pipeline/bare = {rows[backbone]['ratio']:.3f}", flush=True)
    return {
        "batch_size": ctx.plan.batch_size,
        "weights": "random",
        "precision": ctx.plan.feature_precision,
        "tta": ctx.plan.feature_tta,
        "backbones": rows,
    }


def _row_check_cost(arrays_dir: Path, batch_size: int, pipeline_s: float) -> dict:
    """What checking every row against its digest costs, alone, as a share of the whole
    extraction it is part of (issue 23: under 2%)."""
    timed = in_child("row_check", arrays_dir=str(arrays_dir), batch_size=batch_size)
    return {**timed, "share": timed["check_s"] / pipeline_s}


# ---------------------------------------------------------------------------------------------
# 3 and 4. Memory and cost growth


def measure_scaling(ctx: Context) -> dict:
    """Peak memory and seconds per image of both stages on N and on 4N train images."""
    plan = ctx.plan
    backbone = plan.growth_backbone
    size = _input_size(backbone)
    points = {}
    for factor in (1, 4):
        root = ctx.work / f"scale-{factor}N"
        n_train = factor * plan.n_small
        data = symlink_dataset(ctx.data_dir, root / "data", n_train, n_train // 2)
        arrays_dir = root / "arrays"
        pre = in_child(
            "preprocess",
            sample_memory=True,
            data_dir=str(data),
            size=size,
            out_dir=str(arrays_dir),
            workers=plan.workers,
        )
        feat = in_child(
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


# ---------------------------------------------------------------------------------------------
# 5. make submission


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
    data = linked_copy(ctx.data_dir, root / ctx.data_dir.name)  # new key: nothing reused
    args = [f"DATA_DIR={data}", f"BACKBONES={plan.submission_backbones}", "TTA=flip"]
    args += list(plan.submission_args)
    outputs = [config.dataset_dir(data), config.submissions_dir(data)]
    cold_env = _clean_make_env(KERAS_HOME=str(root / "keras-home"))
    try:
        cold = {}
        for target in ("preprocess", "features", "train", "submission"):
            cold[target] = _make(target, args, cold_env)[0]
            print(f"  cold make {target}: {cold[target]:.1f} s", flush=True)
        # Wherever the run folder lives under the dataset's key, it is the only one there.
        metrics = next(config.dataset_dir(data).glob("**/metrics.json"))
        oof = json.loads(metrics.read_text())
        warm_s, stdout, stderr = _make(
            "submission", args, _clean_make_env(PYTHONPROFILEIMPORTTIME="1")
        )
    finally:
        for path in outputs:  # this run's own dataset key: nothing anyone else made
            shutil.rmtree(path, ignore_errors=True)
    processes, modules = _imports(stderr)
    heavy = sorted({m for m in modules if m.split(".")[0] in TF_MODULES})
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
        "heavy_checked": list(TF_MODULES),
    }


# ---------------------------------------------------------------------------------------------
# 6. Precision


def _train_head(features: str, run_dir: Path, folds: int) -> dict:
    """Out-of-fold scores of the logreg head on one feature file, trained as `make train`
    trains it: through the command line, whose run folder holds metrics.json."""
    command = [sys.executable, "-m", "dogscats.cli", "train", "--features", features]
    command += ["--out", str(run_dir), "--head", "logreg", "--tta", "none"]
    command += ["--folds", str(folds), "--seed", str(config.SEED)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"log_loss": metrics["log_loss"], "accuracy": metrics["accuracy"]}


def measure_precision(ctx: Context) -> dict:
    """bfloat16 against float32: extraction speed, feature difference, out-of-fold log loss."""
    plan = ctx.plan
    first = plan.precision_backbones[0]
    bare, main = {}, {}
    for backbone in plan.precision_backbones:
        result = in_child(
            "precision",
            data_dir=str(ctx.data_dir),
            arrays_dir=str(_sample_arrays(ctx, _input_size(backbone))),
            backbone=backbone,
            weights=plan.precision_weights if backbone == first else "random",
            batch_size=plan.batch_size,
            rounds=plan.precision_rounds,
            calls=plan.precision_calls,
            work=str(ctx.work) if backbone == first else None,
        )
        bare[backbone] = result["bare"]
        main = main or result
    heads = {
        precision: _train_head(path, ctx.work / f"run-{precision}", plan.folds)
        for precision, path in main["files"].items()
    }
    extract = main["extract"]
    loss_change = heads["bfloat16"]["log_loss"] - heads["float32"]["log_loss"]
    # The verdict goes by the bare passes' median call, alternated round by round: the
    # end-to-end extractions ran one after the other, so a burst of load could favour either.
    speedups = {
        name: b["median_s"]["float32"] / b["median_s"]["bfloat16"] for name, b in bare.items()
    }
    return {
        "backbone": first,
        "weights": plan.precision_weights,
        "folds": plan.folds,
        "extract": extract,
        "speedup": extract["float32"]["seconds"] / extract["bfloat16"]["seconds"],
        "cpu_speedup": extract["float32"]["cpu_s"] / extract["bfloat16"]["cpu_s"],
        "speedups": speedups,
        "diff": main["diff"],
        "heads": heads,
        "loss_change": loss_change,
        "bare": bare,
        "recommend_default": all(x > 1 for x in speedups.values()) and loss_change <= 0,
    }


# ---------------------------------------------------------------------------------------------
# 6. TensorFlow's CPU allocator

ALLOCATORS = {"default": None, "bfc": "true"}  # TF_CPU_ALLOCATOR_USE_BFC


def measure_allocator(ctx: Context) -> dict:
    """Extraction with TensorFlow's default CPU allocator and with its BFC allocator
    (TF_CPU_ALLOCATOR_USE_BFC=true), alternated round by round on the same arrays: seconds and
    minor page faults per image (the default allocator hands large buffers back to the kernel
    after each batch, and faults them in again)."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend != "tensorflow":
        return {"skipped": f"KERAS_BACKEND={backend}: the allocator is TensorFlow's"}
    plan = ctx.plan
    root = ctx.work / "allocator"
    n_train = plan.allocator_images
    data = symlink_dataset(ctx.data_dir, root / "data", n_train, n_train // 2)
    size = _input_size(plan.allocator_backbone)
    arrays_dir = root / "arrays"
    in_child(
        "preprocess", data_dir=str(data), size=size, out_dir=str(arrays_dir), workers=plan.workers
    )
    runs: dict[str, list[dict]] = {name: [] for name in ALLOCATORS}
    for _ in range(plan.allocator_rounds):
        for name, value in ALLOCATORS.items():
            out = root / f"{name}.h5"
            runs[name].append(
                in_child(
                    "extract",
                    env={"TF_CPU_ALLOCATOR_USE_BFC": value},
                    data_dir=str(data),
                    arrays_dir=str(arrays_dir),
                    backbone=plan.allocator_backbone,
                    weights="random",
                    batch_size=plan.batch_size,
                    out=str(out),
                )
            )
            out.unlink(missing_ok=True)
    best = {name: min(r, key=lambda x: x["seconds"]) for name, r in runs.items()}
    images = best["default"]["images"]
    return {
        "backbone": plan.allocator_backbone,
        "images": images,
        "batch_size": plan.batch_size,
        "runs_s": {name: [r["seconds"] for r in rs] for name, rs in runs.items()},
        "rate": {name: images / b["seconds"] for name, b in best.items()},
        "cpu_s": {name: b["cpu_s"] for name, b in best.items()},
        "faults_per_image": {name: b["minor_faults"] / images for name, b in best.items()},
        "speedup": best["default"]["seconds"] / best["bfc"]["seconds"],
    }


# ---------------------------------------------------------------------------------------------
# 7. Fine-tuning against the forward pass

FINETUNE_VARIANTS = {  # name: (AUGMENT, with the random-transform layers, what the report says)
    "flip": ("flip", True, "AUGMENT=flip: cached maps, top block only"),
    "full": ("full", True, "AUGMENT=full: whole network, augmentation layers"),
    "full_bare": ("full", False, "AUGMENT=full without the augmentation layers"),
}


def _scratch_keras_home(ctx: Context, weights: str) -> dict | None:
    """The child's environment for `weights`: random weights (the quick run's) are exported
    into the scratch folder's KERAS_HOME, not the cache of real ones."""
    return {"KERAS_HOME": str(ctx.work / "keras")} if weights == "random" else None


def measure_litert(ctx: Context) -> dict:
    """LiteRT's forward pass against TensorFlow's bare one, for each offline backbone at its
    default size, in one child process, alternated round by round (tasks.task_litert)."""
    from dogscats.backbones import offline_backbones  # stdlib-only module

    plan = ctx.plan
    names = list(plan.litert_backbones or offline_backbones())
    result = in_child(
        "litert",
        env=_scratch_keras_home(ctx, plan.litert_weights),
        backbones=names,
        weights=plan.litert_weights,
        batch_size=plan.batch_size,
        rounds=plan.litert_rounds,
        calls=plan.litert_calls,
        workers=plan.workers,
    )
    for name, row in result["backbones"].items():
        print(f"  {name}: litert / tensorflow speed = {row['speedup']:.2f}", flush=True)
    return {
        **result,
        "batch_size": plan.batch_size,
        "weights": plan.litert_weights,
        "workers": plan.workers,
        "rounds": plan.litert_rounds,
        "calls": plan.litert_calls,
    }


def measure_finetune(ctx: Context) -> dict:
    """model.fit of the fine-tuning model (BLOCKS=1) on the backend and device in use, each
    variant in a fresh process: training images/s after the first epoch, against the bare
    forward pass of the whole backbone at the same batch size; the first epoch's extra time;
    on JAX, the programs compiled per epoch (a program compiled again each epoch, or per batch
    shape, would show here)."""
    plan = ctx.plan
    arrays_dir = _sample_arrays(ctx, _input_size(plan.finetune_backbone))
    variants = {
        FINETUNE_VARIANTS[name][2]: in_child(
            "finetune",
            arrays_dir=str(arrays_dir),
            backbone=plan.finetune_backbone,
            blocks=1,
            batch_size=plan.batch_size,
            batches=plan.finetune_batches,
            epochs=plan.finetune_epochs,
            augment=FINETUNE_VARIANTS[name][0],
            augmentation=FINETUNE_VARIANTS[name][1],
        )
        for name in plan.finetune_variants
    }
    return {
        "backbone": plan.finetune_backbone,
        "batch_size": plan.batch_size,
        "epochs": plan.finetune_epochs,
        "backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
        "devices": os.environ.get("DEVICES", "auto"),
        "variants": variants,
    }


def measure_cut_cache(ctx: Context) -> dict:
    """Fine-tuning's cut cache (BLOCKS=1) from the images against derived from a BLOCKS=2
    cache, on the whole sample at the backbone's size (tasks.task_cut_cache)."""
    plan = ctx.plan
    arrays_dir = _sample_arrays(ctx, _input_size(plan.cut_cache_backbone))
    result = in_child(
        "cut_cache",
        env=_scratch_keras_home(ctx, plan.cut_cache_weights),
        arrays_dir=str(arrays_dir),
        backbone=plan.cut_cache_backbone,
        weights=plan.cut_cache_weights,
        batch_size=plan.batch_size,
        runtime=plan.cut_cache_runtime,
        work=str(ctx.work / "cut_cache"),
    )
    ratio = result["derived_s"] / result["from_images_s"]
    print(f"  cut cache derived / from the images = {ratio:.2f}", flush=True)
    return {
        **result,
        "backbone": plan.cut_cache_backbone,
        "weights": plan.cut_cache_weights,
        "runtime": plan.cut_cache_runtime,
        "batch_size": plan.batch_size,
    }


MEASUREMENTS: dict[str, Callable[[Context], dict]] = {
    "preprocess": measure_preprocess,
    "features": measure_features,
    "scaling": measure_scaling,
    "submission": measure_submission,
    "precision": measure_precision,
    "allocator": measure_allocator,
    "finetune": measure_finetune,
    "litert": measure_litert,
    "cut_cache": measure_cut_cache,
}
