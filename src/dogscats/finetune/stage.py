"""The `finetune` stage: settings, the up-to-date check, resume, and the run folder.

The run folder has the format of runs.write_run (oof.csv, test.csv, fold_K.joblib holding each
fold's FoldResult, metrics.json) plus logs/ (TensorBoard) and history_K.csv. Until it is
complete, the work lives in <out>.work (per-fold results, checkpoints, backups), from which a
re-run with the same settings resumes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from dogscats import arrays, config, runs, store, train
from dogscats.backbones import BackboneSpec, build_backbone, get_backbone, resolve_keras_weights
from dogscats.finetune.cache import build_cache, cache_folder, lower_cache
from dogscats.finetune.head_run import HeadRun, load_head_run
from dogscats.finetune.hparams import (
    BATCH_SIZE,
    CACHE_DTYPE,
    DROPOUT,
    EPOCHS,
    LEARNING_RATE,
    PATIENCE,
    STOP_FRACTION,
    Hyperparameters,
    Log,
)
from dogscats.finetune.inputs import Source
from dogscats.finetune.model import FineTuneModel, build_model, check_blocks, cut_backbone
from dogscats.finetune.trainer import FoldResult, Trainer, fold_dir

STAGE = "finetune"  # its method version: config.method_version(STAGE)


@dataclass(frozen=True)
class Job:
    """What one fine-tuning run works with: decided once by finetune(), then passed whole."""

    spec: BackboneSpec
    blocks: int
    augment: str
    weights: str  # imagenet | random | a weights file
    weights_dir: str | None
    arrays_dir: Path
    cache_root: Path  # maps at the cut are cached under it
    hp: Hyperparameters
    settings: dict  # recorded in metrics.json: the up-to-date stamp (runs.up_to_date)
    progress: bool
    log: Log
    runtime: str = "keras"  # of the cut cache's forward pass (litert.py)
    workers: int | None = None  # LiteRT's threads (default every core)


def finetune(
    data_dir: str | os.PathLike,
    backbone: str,
    blocks: int = 1,
    head_run: str | os.PathLike | None = None,
    augment: str = "flip",
    weights: str = "imagenet",
    weights_dir: str | None = None,
    arrays_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    epochs: int = EPOCHS,
    learning_rate: float = LEARNING_RATE,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    *,
    patience: int = PATIENCE,
    dropout: float = DROPOUT,
    seed: int = config.SEED,
    stop_fraction: float = STOP_FRACTION,
    cache_dir: str | os.PathLike | None = None,
    cache_dtype: str = CACHE_DTYPE,
    log: Log = print,
    wait: bool = True,
    runtime: str = "keras",
    workers: int | None = None,
) -> Path:
    """Fine-tune the top `blocks` blocks of `backbone` on the head run's folds; return `out`.

    head_run: the `train` run folder of a head fitted on this backbone's features alone.
    cache_dir: where the maps at the cut are cached (default: the dataset's folder).
    wait: False refuses (store.BusyError) when another fine-tuning holds the models folder.
    runtime: what fills that cache: keras, litert or auto (the CLI's default; litert.py).
    """
    spec = get_backbone(backbone)
    hp = Hyperparameters(
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        patience=patience,
        dropout=dropout,
        seed=seed,
        stop_fraction=stop_fraction,
    )
    if augment not in config.AUGMENTS:
        choices = ", ".join(config.AUGMENTS)
        raise ValueError(f"AUGMENT must be one of {choices}. Received: {augment!r}")
    cut_name = check_blocks(spec, blocks)
    arrays_dir = Path(arrays_dir or config.arrays_dir(data_dir, spec.input_size))
    models = config.models_dir(data_dir)
    head_path = Path(head_run or models / config.head_run_name([backbone], config.DEFAULT_HEAD))
    out = Path(out or models / config.finetune_run_name(backbone, blocks, augment))
    # One fine-tuning at a time per models folder (they share the cut cache); the
    # up-to-date check is inside: the run waited for may have just made `out`.
    with store.writer_lock(out.parent, "finetune", wait, log):
        manifest = arrays.read_manifest(arrays_dir)
        train_images, index = arrays.load_split(arrays_dir, "train")
        head = load_head_run(head_path, index)
        settings = {
            "method_version": config.method_version(STAGE),
            "backbone": backbone,
            "blocks": blocks,
            "cut": cut_name,
            "augment": augment,
            "weights": _weights_key(weights, seed),
            "input_size": int(train_images.shape[1]),
            "fingerprint": manifest["fingerprint"],
            "head_run": str(head_path.resolve()),
            "head_run_sha1": config.file_digest(head_path / "oof.csv"),
            **dataclasses.asdict(hp),
            "cache_dtype": cache_dtype if augment == "flip" else None,
        }
        inputs = [
            runs.metrics_path(head_path),
            arrays_dir / arrays.MANIFEST,
            config.method_version_file(STAGE),
        ]
        inputs += [Path(weights)] if weights not in config.WEIGHT_MODES else []
        if runs.up_to_date(out, settings, inputs, log):
            return out
        if weights == "imagenet" and not spec.offline:
            resolve_keras_weights(spec, weights_dir)  # fail now, before any long work
        if head.tta != "flip":
            log(
                f"note: the head in {head_path} predicts without flip TTA; fine-tuned predictions "
                "average plain and mirrored images, so the starting loss differs slightly."
            )
        work = open_work(out, settings, log)
        began = time.monotonic()
        job = Job(
            spec=spec,
            blocks=blocks,
            augment=augment,
            weights=weights,
            weights_dir=weights_dir,
            arrays_dir=arrays_dir,
            cache_root=Path(cache_dir or config.cut_cache_dir(data_dir)),
            hp=hp,
            settings=settings,
            progress=progress,
            log=log,
            runtime=runtime,
            workers=workers,
        )
        net, source, cache_info = _prepare(job, train_images, index)
        _, test_index = arrays.load_split(arrays_dir, "test")
        trainer = Trainer(hp, net, source, head, head.features(index), work, log, progress)
        results = [trainer.run(fold) for fold in range(head.n_folds)]
        run_info = {**cache_info, "wall_s": round(time.monotonic() - began, 1)}
        _write_run(job, out, work, index, test_index, head, results, run_info)
        return out


def _weights_key(weights: str, seed: int) -> str:
    """The weights as settings: a file by path, size and modification time."""
    if weights in config.WEIGHT_MODES:
        return weights if weights == "imagenet" else f"random-seed{seed}"
    stat = os.stat(weights)
    return f"file:{os.path.abspath(weights)}:{stat.st_size}:{stat.st_mtime_ns}"


def work_folder(out: Path) -> Path:
    return out.with_name(out.name + ".work")


def open_work(out: Path, settings: dict, log: Log) -> Path:
    """The work folder: resumed when its settings match, else (said so) started afresh."""
    work = work_folder(out)
    stamp = work / "settings.json"
    stored = store.read_json(stamp)
    if stored is not None:
        changed = store.changed_settings(stored, settings)
        if not changed:
            done = len(list(work.glob("fold_*.joblib")))
            log(f"Resuming the unfinished fine-tuning in {work} ({done} fold(s) done).")
            return work
        log(f"Discarding the unfinished fine-tuning in {work}: {', '.join(changed)} changed.")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store.write_json(stamp, settings)
    return work


def _prepare(
    job: Job, train_images: np.ndarray, train_index: pd.DataFrame
) -> tuple[FineTuneModel, Source, dict]:
    """Build and cut the backbone; cache the maps at the cut ("flip"); build the model."""
    # Seeds the random weights (the same net on every resume) and the dropout seed generators.
    spec, settings, log = job.spec, job.settings, job.log
    keras.utils.set_random_seed(job.hp.seed)
    if job.weights == "random":
        log(f"*** WEIGHTS=random: {spec.name} gets RANDOM weights (tests and dry runs). ***")
    backbone = build_backbone(
        spec.name,
        weights=job.weights,
        weights_dir=job.weights_dir,
        input_size=settings["input_size"],
        pooling=None,
    )
    cut = cut_backbone(backbone, spec, job.blocks)
    cut_shape = tuple(cut.top.inputs[0].shape[1:])
    trainable = sum(int(np.prod(w.shape)) for w in cut.top.trainable_weights)
    log(
        f"{spec.name}: fine-tuning the top {job.blocks} block(s) from "
        f"{', '.join(cut.first_layers)} (cut at {cut.layer}, maps {cut_shape}), "
        f"{trainable:,} trainable weights + head; augment={job.augment}"
    )
    if job.augment == "flip":
        source, cache_info = _cached_source(job, cut)
    else:
        test_images, test_index = arrays.load_split(job.arrays_dir, "test")
        checks = {
            split: arrays.row_check(job.arrays_dir, split, index)
            for split, index in (("train", train_index), ("test", test_index))
        }
        source = Source(train_images, test_images, cached=False, checks=checks)
        cache_info = {"cache": None, "cache_wall_s": 0.0}
    net = build_model(cut, spec.name, job.augment, source.item_shape, job.hp.dropout)
    return net, source, cache_info


def _cached_source(job: Job, cut) -> tuple[Source, dict]:
    """The maps at the cut, plain and mirrored, from the cache (filled first if need be)."""
    began = time.monotonic()
    settings = job.settings
    folder = cache_folder(job.cache_root, job.spec.name, settings["cut"], settings)
    # A cache of more blocks holds what this one needs: only the blocks between then run.
    lower = lower_cache(job.cache_root, job.spec, job.blocks, settings, job.arrays_dir)
    maps = build_cache(
        folder,
        cut,
        job.spec,
        job.arrays_dir,
        job.hp.batch_size,
        settings["cache_dtype"],
        job.progress,
        job.log,
        job.runtime,
        job.workers,
        lower,
    )
    source = Source(maps["train"], maps["test"], cached=True)
    return source, {"cache": str(folder), "cache_wall_s": round(time.monotonic() - began, 1)}


def _write_run(
    job: Job,
    out: Path,
    work: Path,
    index: pd.DataFrame,
    test_index: pd.DataFrame,
    head: HeadRun,
    results: list[FoldResult],
    run_info: dict,
) -> None:
    """Assemble the folds into a run folder (runs.py) with the logs moved in; drop the work."""
    y = index["label"].to_numpy(int)
    oof = np.zeros(len(y))
    test = np.zeros(len(test_index))
    for result in results:
        oof[head.folds == result.fold] = result.val_pred
        test += result.test_pred / len(results)
    fold_scores = [
        {**train.scores(y[head.folds == r.fold], r.val_pred), **r.score()} for r in results
    ]
    cv = train.CVResult(oof, test, head.folds, fold_scores, results)
    metrics = _metrics(job.settings, cv.summary(y), head, y, results, run_info, fold_scores)
    predictions = runs.Predictions(
        train_ids=index["id"].to_numpy(),
        y=y,
        folds=head.folds,
        oof=oof,
        test_ids=test_index["id"].to_numpy(),
        test=test,
    )
    extras = {"logs": work / "logs"}  # TensorBoard's, one folder per fold
    extras |= {
        runs.HISTORY.format(fold=r.fold): fold_dir(work, r.fold) / "history.csv" for r in results
    }
    runs.write_run(out, predictions, metrics, models=results, extras=extras)
    shutil.rmtree(work, ignore_errors=True)
    job.log(
        f"out-of-fold: log_loss={metrics['log_loss']:.5f} accuracy={metrics['accuracy']:.4f} "
        f"(head {metrics['head_log_loss']:.5f}); wrote {out}"
    )


def _metrics(
    settings: dict,
    summary: dict,
    head: HeadRun,
    y: np.ndarray,
    results: list[FoldResult],
    run_info: dict,
    fold_scores: list[dict],
) -> dict:
    return {
        **summary,
        "head": "finetune",
        "head_run": str(head.path),
        "head_log_loss": train.scores(y, head.oof)["log_loss"],
        "backbone": settings["backbone"],
        "blocks": settings["blocks"],
        "augment": settings["augment"],
        "tta": "flip",
        "folds": head.n_folds,
        "seed": settings["seed"],
        "head_kept_folds": [r.fold for r in results if r.kept == "head"],
        **run_info,
        "fold_scores": fold_scores,
        "settings": settings,
    }
