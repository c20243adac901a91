"""Sizes of one benchmark run, its scratch context, and the data sets it makes of symlinks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

STAGES = (
    "preprocess",
    "features",
    "scaling",
    "submission",
    "precision",
    "allocator",
    "finetune",
    "litert",
    "cut_cache",
)


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run; the default takes many minutes (bench/REPORT.md says how
    many), the quick one a short while."""

    size: int = 224  # input size of both throughput backbones
    workers: int = os.cpu_count() or 1
    repeats: int = 5  # preprocessing variants are interleaved this many times; best counts
    preprocess_scales: tuple[int, ...] = (1, 4)  # the data set, then 4x as many symlinks
    enlarged: tuple[int, int] | None = (500, 375)  # also on the images enlarged to this size
    batch_size: int = 32
    backbones: tuple[str, ...] = ("resnet50", "efficientnet_lite0")
    feature_precision: str = "float32"  # of the extraction and its bare forward pass
    feature_tta: str = "none"  # "flip": both compute the mirrored pass too
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
    allocator_backbone: str = "efficientnet_lite1"
    allocator_images: int = 600  # train images (half as many test) extracted per run
    allocator_rounds: int = 2  # alternations of TensorFlow's default CPU allocator and BFC
    finetune_backbone: str = "efficientnet_lite0"
    finetune_batches: int = 8  # per epoch (the last one partial, as in a real fold)
    finetune_epochs: int = 3
    finetune_variants: tuple[str, ...] = ("flip", "full", "full_bare")  # stages.FINETUNE_VARIANTS
    litert_backbones: tuple[str, ...] = ()  # empty: BACKBONES=offline, each at its size
    litert_weights: str = "imagenet"  # real weights: the match check means something with them
    litert_rounds: int = 4  # alternations of TensorFlow and LiteRT
    litert_calls: int = 4  # forward calls of each per round
    cut_cache_backbone: str = "efficientnet_lite0_288"  # BLOCKS=1 from the images / from BLOCKS=2
    cut_cache_weights: str = "imagenet"
    cut_cache_runtime: str = "auto"  # as make finetune fills it on a CPU (LiteRT)


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
    allocator_images=8,
    allocator_rounds=1,
    finetune_batches=3,
    finetune_epochs=2,
    finetune_variants=("flip",),
    litert_backbones=("efficientnet_lite0",),
    litert_weights="random",
    litert_rounds=1,
    litert_calls=1,
    cut_cache_backbone="efficientnet_lite0",
    cut_cache_weights="random",
    cut_cache_runtime="keras",
)


@dataclass
class Context:
    data_dir: Path
    work: Path  # scratch folder under /tmp, removed at the end
    plan: Plan
    arrays: dict[int, Path] = field(default_factory=dict)  # sample arrays by input size


# ---------------------------------------------------------------------------------------------
# Data sets made of symlinks (never copies)


def symlink_dataset(source: Path, target: Path, n_train: int, n_test: int) -> Path:
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


def linked_copy(source: Path, target: Path) -> Path:
    """The same dataset under another path (a new dataset key): folder-level symlinks."""
    target.mkdir(parents=True)
    for name in ("train", "test", "sample_submission.csv"):
        if (source / name).exists():
            (target / name).symlink_to(source / name)
    return target
