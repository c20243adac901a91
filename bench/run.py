"""`make bench`: each stage's speed and memory beside its bare counterpart, as a markdown report.

    python bench/run.py --data-dir D --out bench/REPORT.md [--quick] [--stages S ...]

Every figure comes with the figure it is judged against, measured in the same run: the pipeline
against the bare OpenCV loop or the bare forward pass of the same compiled model. The benchmark
lives outside the package and drives it through its public API and its command line only. Each
measured piece of work runs in a fresh child process (child.py, tasks.py); this parent imports
the standard library and dogscats' stdlib-only modules (config, backbones) only. `--quick` does
the same on tiny sizes so that tests/test_bench.py keeps the tool from rotting; its numbers mean
nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from plan import QUICK, STAGES, Context, Plan
from report import render
from stages import MEASUREMENTS
from tasks import SPLITS

from dogscats import config


def run(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    quick: bool = False,
    stages: list[str] | None = None,
    overrides: dict | None = None,
) -> dict:
    """Measure the chosen stages (all by default), write the report to `out`, return results.

    Raises RuntimeError after writing the report when a stage failed.
    """
    data_dir, out = Path(os.path.abspath(os.fspath(data_dir))), Path(out)
    chosen = _check_stages(stages)
    plan = QUICK if quick else Plan()
    if quick:
        plan = replace(plan, workers=min(plan.workers, 2))
    plan = replace(plan, **(overrides or {}))
    clock = _Clock()
    meta = {
        "command": _command(data_dir, out, quick, stages, overrides or {}),
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


def _check_stages(stages: list[str] | None) -> list[str]:
    chosen = list(stages) if stages else list(STAGES)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise ValueError(f"Unknown bench stage(s) {unknown}. Valid: {', '.join(STAGES)}.")
    return [s for s in STAGES if s in chosen]


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)

    def minutes(self) -> float:
        return (time.perf_counter() - self.start) / 60


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


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# What the report says about the run, the data and the machine


def _command(
    data_dir: Path, out: Path, quick: bool, stages: list[str] | None, overrides: dict
) -> str:
    command = f"python bench/run.py --data-dir {data_dir} --out {out}"
    command += " --quick" * quick + (f" --stages {' '.join(stages)}" if stages else "")
    flags = {"feature_precision": "precision", "feature_tta": "tta"}
    for name, value in overrides.items():
        shown = " ".join(value) if isinstance(value, tuple) else value
        command += f" --{flags.get(name, name).replace('_', '-')} {shown}"
    backend = os.environ.get("KERAS_BACKEND")
    command = (f"KERAS_BACKEND={backend} " if backend else "") + command
    return ("make bench: " if os.environ.get("MAKELEVEL") else "") + command


def _count_images(data_dir: Path) -> str:
    counts = {split: len(os.listdir(data_dir / split)) for split in SPLITS}
    return f"{counts['train']} train + {counts['test']} test images"


def _sizes_text(plan: Plan) -> str:
    return (
        f"Throughput on the whole data set; memory and growth on N = {plan.n_small} and "
        f"4N = {4 * plan.n_small} train images. Workers: {plan.workers}; batch size "
        f"{plan.batch_size}; preprocessing variants best of {plan.repeats}."
    )


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
    versions["KERAS_BACKEND"] = os.environ.get("KERAS_BACKEND", "tensorflow")
    for package in (
        "tensorflow",
        "jax",
        "jaxlib",
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


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="Kaggle-layout folder: train/, test/")
    parser.add_argument("--out", default="bench/REPORT.md", help="markdown report to write")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the tool runs")
    parser.add_argument(
        "--stages", nargs="*", default=None, help=f"subset of: {', '.join(STAGES)}"
    )
    features = parser.add_argument_group("feature extraction (defaults: the plan's)")
    features.add_argument("--backbones", nargs="+", help="backbones to extract with")
    features.add_argument("--batch-size", type=int, help="extraction batch")
    features.add_argument("--precision", choices=config.PRECISIONS, help="compute precision")
    features.add_argument("--tta", choices=config.TTAS, help="flip: the mirrored pass too")
    features.add_argument("--feature-repeats", type=int, help="pipeline-and-bare runs each")
    return parser.parse_args(argv)


def plan_overrides(args: argparse.Namespace) -> dict:
    """The Plan fields the command line sets (an accelerator wants larger batches, say)."""
    given = {
        "backbones": tuple(args.backbones) if args.backbones else None,
        "batch_size": args.batch_size,
        "feature_precision": args.precision,
        "feature_tta": args.tta,
        "feature_repeats": args.feature_repeats,
    }
    return {name: value for name, value in given.items() if value is not None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(
            args.data_dir,
            args.out,
            quick=args.quick,
            stages=args.stages,
            overrides=plan_overrides(args),
        )
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)  # a failed stage's report is written already
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
