"""One fold at a time: start from the pretrained top and a refitted head, fit, keep the better.

Early stopping watches a stratified share of the fold's training rows (STOP_FRACTION), never
the fold's validation rows, so the out-of-fold predictions are honest. The fold's head was
fitted on those rows too, so the Dense layer starts from a head of the same kind refitted
without them: before the first step the model predicts what that head predicts, and its loss
on the early-stopping rows is the score to beat. A fold that never beats it keeps the fold
head's own predictions. Each fold's work (checkpoints, backup, history) lives in
<work>/fold_K/; its result in <work>/fold_K.joblib, from which a re-run resumes.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import keras
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from dogscats import store, train
from dogscats.features import FeatureSet
from dogscats.finetune import callbacks
from dogscats.finetune.head_run import HeadRun
from dogscats.finetune.hparams import Hyperparameters, Log
from dogscats.finetune.inputs import EpochDraws, Source, make_dataset
from dogscats.finetune.model import FineTuneModel, compile_model


@dataclass
class FoldResult:
    """One fold's outcome; fold_K.joblib of the run folder holds it."""

    fold: int
    kept: str  # "finetuned", or "head" when fine-tuning did not beat the head
    head_log_loss: float  # on the fold's validation rows
    finetuned_log_loss: float | None  # the kept fine-tuned model's; None when the head is kept
    # On the early-stopping rows: the head refitted without them (the score to beat), the
    # model before its first step (which starts from that head: the same loss under flip
    # TTA), and the best that fine-tuning reached.
    stop_head_log_loss: float
    stop_start_log_loss: float
    stop_log_loss: float
    epochs: int
    best_epoch: int | None
    wall_s: float
    resumed: bool
    val_pred: np.ndarray
    test_pred: np.ndarray
    top_weights: list  # weights behind this fold's predictions (Cut.top, then the dense head)
    head_weights: list

    def score(self) -> dict:
        return {
            "head_log_loss": self.head_log_loss,
            "finetuned_log_loss": self.finetuned_log_loss,
            "stop_head_log_loss": self.stop_head_log_loss,
            "stop_start_log_loss": self.stop_start_log_loss,
            "stop_log_loss": self.stop_log_loss,
            "kept": self.kept,
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "wall_s": round(self.wall_s, 1),
            "resumed": self.resumed,
        }


def fold_result_path(work: Path, fold: int) -> Path:
    return work / f"fold_{fold}.joblib"


def fold_dir(work: Path, fold: int) -> Path:
    """A fold's work in progress: checkpoints, backup and history.csv."""
    return work / f"fold_{fold}"


@dataclass
class Trainer:
    """Fine-tunes one fold at a time, each from the pretrained top and a head refitted
    without the fold's early-stopping rows."""

    hp: Hyperparameters
    net: FineTuneModel
    source: Source
    head: HeadRun
    features: FeatureSet  # the head's, in the arrays' row order
    work: Path
    log: Log = print
    progress: bool = True
    pretrained_top: list = field(init=False)  # every fold starts from these

    def __post_init__(self) -> None:
        self.pretrained_top = self.net.cut.top.get_weights()
        self.y = self.features.y

    def run(self, fold: int) -> FoldResult:
        done = fold_result_path(self.work, fold)
        if done.is_file():
            result = joblib.load(done)
            self.log(f"fold {fold}: done in an earlier run. " + summary_line(result))
            return result
        result = self._train(fold)
        store.write_joblib(done, result)
        shutil.rmtree(fold_dir(self.work, fold) / "backup", ignore_errors=True)
        self.log(f"fold {fold}: " + summary_line(result))
        return result

    def _train(self, fold: int) -> FoldResult:
        # The seeding fixes the predictions; the training batches draw from (seed, epoch).
        began = time.monotonic()
        work_dir = fold_dir(self.work, fold)
        resumed = work_dir.exists()
        work_dir.mkdir(exist_ok=True)
        keras.utils.set_random_seed(self.hp.seed + fold)
        fit_rows, stop_rows = self._stop_split(fold)
        val_rows = np.flatnonzero(self.head.folds == fold)
        head_loss = self._score(val_rows, self.head.oof[val_rows])
        # The fold's head was fitted on the early-stopping rows too, so its loss there is
        # flattering; a head refitted without them is the start and the honest score to beat.
        start_head = self.head.refit(self.features, fit_rows, self.hp.seed + fold)
        stop_pred = train.predict_rows(start_head, self.features, stop_rows)
        stop_head_loss = self._score(stop_rows, stop_pred)
        self.net.set_start(self.pretrained_top, *start_head.dense_weights())
        batch_size = self.hp.batch_size
        val = make_dataset(self.source, "train", val_rows, self.y, batch_size, False)
        stop = make_dataset(self.source, "train", stop_rows, self.y, batch_size, False)
        test_rows = np.arange(len(self.source.test))
        test = make_dataset(self.source, "test", test_rows, None, batch_size, False)
        stop_start_loss = self._score(stop_rows, self._predict(stop))
        steps = math.ceil(len(fit_rows) / batch_size)
        compile_model(self.net.model, self.hp.learning_rate, steps, self.hp.epochs)
        self.log(
            f"fold {fold}: {len(fit_rows)} train / {len(stop_rows)} early-stopping / "
            f"{len(val_rows)} validation images; on the early-stopping rows the head refitted "
            f"without them scores {stop_head_loss:.5f} (model before training "
            f"{stop_start_loss:.5f})" + (" (resuming)" if resumed else "")
        )
        if not (work_dir / "fit_done").exists():
            self._fit(
                fold, work_dir, fit_rows, lambda: self._scores(stop_rows, stop), stop_head_loss
            )
        history = callbacks.read_history(work_dir)
        best = callbacks.best_weights_path(work_dir)
        # Saved only for an epoch that beat the head on the early-stopping rows (even across
        # interruptions): the validation rows are scored, never consulted.
        kept = "finetuned" if best.is_file() else "head"
        tuned_pred = tuned_loss = None
        if kept == "finetuned":
            self.net.model.load_weights(str(best))
            tuned_pred = self._predict(val)
            tuned_loss = self._score(val_rows, tuned_pred)
        else:  # the test predictions too come from the fold's own head
            self.net.set_start(self.pretrained_top, *self.head.dense_weights(fold))
        wall_s = time.monotonic() - began  # training and validation; not the test predictions
        test_pred = self._predict(test)
        top_weights, head_weights = self.net.trained_weights()
        return FoldResult(
            fold=fold,
            kept=kept,
            head_log_loss=head_loss,
            finetuned_log_loss=tuned_loss,
            stop_head_log_loss=stop_head_loss,
            stop_start_log_loss=stop_start_loss,
            stop_log_loss=float(history["val_loss"].min()),
            epochs=int(history["epoch"].nunique()),
            best_epoch=best_epoch(history),
            wall_s=wall_s,
            resumed=resumed,
            val_pred=tuned_pred if kept == "finetuned" else self.head.oof[val_rows],
            test_pred=test_pred,
            top_weights=top_weights,
            head_weights=head_weights,
        )

    def _stop_split(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(self.head.folds != fold)
        return early_stopping_split(rows, self.y, self.hp.stop_fraction, self.hp.seed + fold)

    def _fit(self, fold, work_dir, fit_rows, stop_score, stop_head_loss) -> None:
        history = callbacks.read_history(work_dir)
        best_so_far = float(history["val_loss"].min()) if len(history) else math.inf
        train_set = make_dataset(
            self.source, "train", fit_rows, self.y, self.hp.batch_size, True, self.hp.seed + fold
        )
        log_dir = self.work / "logs" / f"fold_{fold}"
        fold_callbacks = callbacks.fold_callbacks(
            work_dir, log_dir, stop_score, stop_head_loss, best_so_far, self.hp.patience
        )
        # The model serves every fold: forget the epoch a resumed fold restarted from
        # (BackupAndRestore sets it and nothing resets it), or the next fold would start there.
        self.net.model._initial_epoch = None
        self.net.model.fit(  # no validation_data: the early-stopping rows are scored by a callback
            train_set,
            epochs=self.hp.epochs,
            callbacks=[EpochDraws(train_set), *fold_callbacks],
            shuffle=False,  # the dataset shuffles itself, once per epoch
            verbose=1 if self.progress else 0,
        )
        (work_dir / "fit_done").touch()  # a re-run goes straight to predicting

    def _predict(self, dataset) -> np.ndarray:
        return self.net.predict(dataset)

    def _scores(self, rows: np.ndarray, dataset) -> dict[str, float]:
        """The model's scores on these rows, as the head's and the held-out fold's are."""
        return train.scores(self.y[rows], self._predict(dataset))

    def _score(self, rows: np.ndarray, pred: np.ndarray) -> float:
        return train.scores(self.y[rows], pred)["log_loss"]


def early_stopping_split(
    rows: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows to train on, rows to decide early stopping on): a stratified share `fraction` of
    `rows`, the same for the same seed, so a resumed fold keeps its split."""
    n_stop = max(2, round(fraction * len(rows)))  # one of each class at least
    fit_rows, stop_rows = train_test_split(
        rows, test_size=n_stop, stratify=y[rows], random_state=seed
    )
    return np.sort(fit_rows), np.sort(stop_rows)


def best_epoch(history: pd.DataFrame) -> int | None:
    """1-based epoch of the lowest loss on the early-stopping rows; None before any epoch."""
    if not len(history):
        return None
    return int(history.loc[history["val_loss"].idxmin(), "epoch"]) + 1


def summary_line(result: FoldResult) -> str:
    verdict = (
        "kept fine-tuned"
        if result.kept == "finetuned"
        else "fine-tuning did not beat the head there: kept the head's predictions"
    )
    best = f", best epoch {result.best_epoch} of {result.epochs}" if result.best_epoch else ""
    tuned = "" if result.finetuned_log_loss is None else f" -> {result.finetuned_log_loss:.5f}"
    return (
        f"validation log_loss head {result.head_log_loss:.5f}{tuned}; early-stopping rows "
        f"{result.stop_head_log_loss:.5f} -> {result.stop_log_loss:.5f}{best}; {verdict}; "
        f"{result.wall_s:.0f} s"
    )
