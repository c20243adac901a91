"""The head run that fine-tuning starts from: its folds, predictions and fold models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dogscats import heads, runs, train
from dogscats.features import FeatureSet, load_feature_set


@dataclass
class HeadRun:
    run: runs.Run
    folds: np.ndarray  # fold of each train row, in the arrays' row order
    oof: np.ndarray  # the head's out-of-fold predictions, same order
    tta: str
    name: str  # logreg | keras
    feature_files: list[str]  # what it was fitted on

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def n_folds(self) -> int:
        return self.run.n_folds

    def dense_weights(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        return self.run.model(fold).dense_weights()

    def features(self, index: pd.DataFrame) -> FeatureSet:
        """The features the head was fitted on, checked to be in the arrays' row order."""
        missing = [name for name in self.feature_files if not Path(name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{', '.join(missing)} (the features of the head in {self.path}) not found: "
                "run `make finetune`, which extracts them and refits the head."
            )
        data = load_feature_set(self.feature_files, tta=self.tta)
        same_rows = np.array_equal(data.train_ids.astype(str), index["id"].astype(str))
        if not (same_rows and np.array_equal(data.y, index["label"])):
            raise ValueError(
                f"{', '.join(self.feature_files)} hold other train images than the arrays: "
                "extract them again (`make features`)."
            )
        return data

    def refit(self, data: FeatureSet, rows: np.ndarray, seed: int):
        """A head of the same kind fitted on these rows only."""
        return train.fit_on_rows(heads.make_head(self.name, seed), data, rows)


def load_head_run(path: Path, index: pd.DataFrame) -> HeadRun:
    """The head's folds and predictions, aligned by id with the train arrays."""
    try:
        run = runs.read_run(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error} Fine-tuning starts from a head fitted on the same backbone's features: "
            "`make finetune` fits that head first, or `make train BACKBONES=<backbone> "
            "HEAD=logreg`."
        ) from error
    _check_fine_tunable(run)
    merged = index[["id", "label"]].merge(run.oof, on="id", how="left", suffixes=("", "_head"))
    if len(run.oof) != len(index) or merged["fold"].isna().any():
        raise ValueError(
            f"The head in {path} was fitted on other train images than the arrays hold "
            f"({len(run.oof)} vs {len(index)} rows, or other ids): refit it (`make train`)."
        )
    if not np.array_equal(merged["label"], merged["label_head"]):
        raise ValueError(f"Labels in {path / 'oof.csv'} differ from the arrays' labels.")
    return HeadRun(
        run,
        merged["fold"].astype(int).to_numpy(),
        merged["pred"].to_numpy(float),
        run.metrics.get("tta", "none"),
        run.metrics["head"],
        run.metrics["feature_files"],
    )


def _check_fine_tunable(run: runs.Run) -> None:
    """The head must be one Dense layer (dense_weights) and keep a model per fold."""
    head = run.metrics.get("head")
    if not hasattr(heads.HEADS.get(head), "dense_weights"):
        raise ValueError(
            f"The {head} head in {run.path} is no dense layer to start from: "
            "fine-tuning needs FT_HEAD=logreg or FT_HEAD=keras."
        )
    missing = [k for k in range(run.n_folds) if not run.model_path(k).is_file()]
    if missing:
        raise ValueError(
            f"{run.path} has no fitted model for fold(s) {missing}: fit the head again "
            "(`make train`); fine-tuning needs FT_HEAD=logreg or FT_HEAD=keras."
        )
