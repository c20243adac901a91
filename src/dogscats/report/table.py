"""The runs table: one row per finished run of a dataset, from its run folder and submission.

Every number comes from what the stages wrote (runs.read_run, metrics.json) or from the
functions that computed it there (submission.choose_clip, submission.score): the report never
re-derives a metric its own way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dogscats import config, runs, submission


@dataclass
class RunRow:
    """What the table shows of one run."""

    run: runs.Run
    name: str
    backbones: list[str]
    head: str
    tta: str
    folds: int
    log_loss: float  # out-of-fold, unclipped (metrics.json)
    log_loss_std: float  # over folds
    accuracy: float
    accuracy_std: float
    clip: float | None  # of the scored submission; None without one
    submission: Path | None
    test_log_loss: float | None  # submission.score against LABELS; None without labels
    test_accuracy: float | None
    wall_s: float | None  # None for runs written before the stages recorded it

    @property
    def label(self) -> str:
        """A short name for plots: backbones, head, TTA."""
        short = "+".join(name.replace("efficientnet_", "") for name in self.backbones)
        return f"{short} · {self.head}" + (" · flip" if self.tta == "flip" else "")


def _describe(metrics: dict) -> tuple[list[str], str]:
    """Backbones and head of a run, from what its stage recorded. A blend has no backbones
    of its own: it shows how many runs it blends and how many got a weight."""
    if metrics.get("head") == "blend":
        weights = metrics.get("weights", {})
        weighted = sum(round(weight, 4) > 0 for weight in weights.values())  # as printed
        return [f"{len(weights)} runs, {weighted} weighted"], "blend"
    if metrics.get("head") == "finetune":
        blocks, augment = int(metrics.get("blocks", 1)), metrics.get("augment", "flip")
        head = f"fine-tune {blocks} block" + ("s" if blocks != 1 else "")
        return [metrics["backbone"]], head + ("" if augment == "flip" else f", aug {augment}")
    return [config.feature_backbone(f) for f in metrics.get("feature_files", [])], metrics["head"]


def _fold_spread(metrics: dict, key: str) -> float:
    values = [fold[key] for fold in metrics.get("fold_scores", []) if key in fold]
    return float(np.std(values)) if values else float("nan")


def _pick_submission(found: dict[str, Path]) -> tuple[str, Path] | None:
    """The run's auto-clip submission (make's default) if written, else its newest one."""
    if "auto" in found:
        return "auto", found["auto"]
    if not found:
        return None
    return max(found.items(), key=lambda item: item[1].stat().st_mtime)


def read_row(
    data_dir: str | os.PathLike, run_dir: Path, labels: str | os.PathLike | None
) -> RunRow:
    run = runs.read_run(run_dir)
    metrics = run.metrics
    backbones, head = _describe(metrics)
    picked = _pick_submission(config.run_submissions(data_dir, run_dir.name))
    clip = path = None
    test = {"log_loss": None, "accuracy": None}
    if picked is not None:
        clip_name, path = picked
        y, p = run.oof["label"].to_numpy(), run.oof["pred"].to_numpy()
        clip = submission.choose_clip(y, p) if clip_name == "auto" else float(clip_name)
        if labels is not None:
            test = submission.score(path, labels)  # what `make score` prints
    return RunRow(
        run=run,
        name=run_dir.name,
        backbones=backbones,
        head=head,
        tta=metrics.get("tta", "none"),
        folds=run.n_folds,
        log_loss=float(metrics["log_loss"]),
        log_loss_std=_fold_spread(metrics, "log_loss"),
        accuracy=float(metrics["accuracy"]),
        accuracy_std=_fold_spread(metrics, "accuracy"),
        clip=clip,
        submission=path,
        test_log_loss=test["log_loss"],
        test_accuracy=test["accuracy"],
        wall_s=metrics.get("wall_s"),
    )


def read_rows(
    data_dir: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
    progress=None,
) -> list[RunRow]:
    """Every finished run of the dataset, best (lowest out-of-fold log loss) first."""
    folders = config.list_runs(models_dir or config.models_dir(data_dir))
    rows = []
    for folder in folders:
        rows.append(read_row(data_dir, folder, labels))
        if progress is not None:
            progress.update(1)
    return sorted(rows, key=lambda row: (row.log_loss, row.name))


def pick_run(rows: list[RunRow], name: str | None) -> RunRow:
    """The run named by RUN= (a run folder's name or path), or the best one."""
    if not name:
        return rows[0]
    wanted = Path(name).name
    for row in rows:
        if row.name == wanted:
            return row
    names = "\n  ".join(row.name for row in rows)
    raise ValueError(f"RUN={name!r} is not a finished run of this dataset. Its runs:\n  {names}")
