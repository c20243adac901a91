"""The run folder: what a head (train) or fine-tuning (finetune) leaves for submission, blends
and reports. Written here, read here; no other module touches its files by name.

<models>/<run>/
    oof.csv         id, label, fold, pred   out-of-fold P(dog) of every train image
    test.csv        id, pred                fold-averaged P(dog) of every test image
    fold_K.joblib   the fitted model of fold K (absent for runs that keep none)
    metrics.json    scores, settings (the up-to-date stamp) and anything the stage adds
    ...             stage extras moved in whole (fine-tuning: history_K.csv, logs/)
The folder is assembled under a partial name and replaces the old one whole. metrics.json
lists the predictions and fold models with their sizes: a run that lacks one of them (deleted,
cut) is not finished for make (plan.py) nor for `up_to_date` and `read_run`.
Standard library at import time (NumPy and pandas inside the functions that need them): the
plan asks `missing_files` on every make.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dogscats import config, messages, store

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

METRICS = config.RUN_METRICS
HISTORY = "history_{fold}.csv"  # fine-tuning's per-fold epochs (Keras CSVLogger)
PREDICTIONS = ("oof.csv", "test.csv")
FILES = "files"  # metrics' {name: size} of the predictions and fold models written


@dataclass
class Predictions:
    """Out-of-fold and test predictions with their ids: the body of every run."""

    train_ids: np.ndarray
    y: np.ndarray
    folds: np.ndarray
    oof: np.ndarray
    test_ids: np.ndarray
    test: np.ndarray


def metrics_path(run_dir: str | os.PathLike) -> Path:
    """The file whose presence marks a finished run (make's target for it)."""
    return Path(run_dir) / METRICS


def write_run(
    out: str | os.PathLike,
    predictions: Predictions,
    metrics: dict,
    models: list = (),
    extras: dict[str, Path] | None = None,
) -> Path:
    """Write the run folder whole: predictions, fold models, metrics, and `extras`
    ({name in the run folder: file or folder to move in})."""
    import pandas as pd

    out = Path(out)
    p = predictions
    with store.atomic_dir(out) as tmp:
        oof = pd.DataFrame({"id": p.train_ids, "label": p.y, "fold": p.folds, "pred": p.oof})
        oof.to_csv(tmp / "oof.csv", index=False)
        pd.DataFrame({"id": p.test_ids, "pred": p.test}).to_csv(tmp / "test.csv", index=False)
        for fold, model in enumerate(models):
            store.write_joblib(tmp / f"fold_{fold}.joblib", model)
        for name, source in (extras or {}).items():
            if Path(source).exists():
                os.replace(source, tmp / name)
        names = [*PREDICTIONS, *(f"fold_{fold}.joblib" for fold in range(len(models)))]
        files = {name: (tmp / name).stat().st_size for name in names}
        store.write_json(tmp / METRICS, {**metrics, FILES: files})
    return out


@dataclass
class Run:
    """A finished run folder, read back."""

    path: Path
    oof: pd.DataFrame  # id (str), label, fold, pred
    test: pd.DataFrame  # id (str), pred
    metrics: dict

    @property
    def n_folds(self) -> int:
        return int(self.oof["fold"].max()) + 1

    def model_path(self, fold: int) -> Path:
        return self.path / f"fold_{fold}.joblib"

    def model(self, fold: int):
        import joblib

        return joblib.load(self.model_path(fold))

    def histories(self) -> dict[int, pd.DataFrame]:
        """{fold: its epochs (epoch, loss, val_loss, ...)} of a fine-tuning run; {} for others."""
        import pandas as pd

        found = {}
        for fold in range(self.n_folds):
            path = self.path / HISTORY.format(fold=fold)
            if path.is_file() and path.stat().st_size:
                found[fold] = pd.read_csv(path)
        return found


def read_run(run_dir: str | os.PathLike) -> Run:
    """A finished run; a clear error naming the folder when it is not one."""
    path = Path(run_dir)
    metrics = store.read_json(metrics_path(path))
    if metrics is None:
        raise FileNotFoundError(
            f"{metrics_path(path)} not found or unreadable: {path} is not a finished run. "
            "Run `make train` (or `make finetune`) for it first."
        )
    lacking = missing_files(path)
    if lacking:
        store.set_aside(metrics_path(path))
        raise store.DamagedFileError(
            f"{path / lacking[0]} is damaged: {_lacking_text(lacking)}. Set the run aside; run "
            "make (or `make train` / `make finetune`) again to redo it."
        )
    oof = _read_predictions(path, "oof.csv", ["id", "label", "fold", "pred"])
    test = _read_predictions(path, "test.csv", ["id", "pred"])
    return Run(path, oof, test, metrics)


def _read_predictions(run_dir: Path, name: str, columns: list[str]) -> pd.DataFrame:
    """A run's predictions, checked: the columns, at least one row, finite values in [0, 1].
    A damaged file is refused by name and the run's stamp set aside, so make redoes the run."""
    import pandas as pd

    path = run_dir / name
    try:
        frame = pd.read_csv(path, dtype={"id": str})
        problem = None
        if list(frame.columns) != columns or frame.empty:
            problem = f"expected columns {','.join(columns)} and rows"
        elif not frame["pred"].between(0, 1).all():  # NaN fails too
            problem = "predictions missing or outside [0, 1]"
    except (OSError, ValueError) as error:
        problem = f"unreadable ({messages.first_line(error)})"
    if problem is not None:
        store.set_aside(metrics_path(run_dir))
        raise store.DamagedFileError(
            f"{path} is damaged: {problem}. Set the run aside; run make (or `make train`) "
            "again to redo it."
        )
    return frame


def stored_settings(run_dir: str | os.PathLike) -> dict | None:
    """The settings a finished run recorded, or None (no run, or a damaged stamp)."""
    metrics = store.read_json(metrics_path(run_dir))
    return None if metrics is None else metrics.get("settings")


def missing_files(run_dir: str | os.PathLike) -> list[str]:
    """The files a finished run lacks or holds at another size than written (none when it is
    whole; none when it is not finished). Runs written before metrics listed their files:
    the predictions, and fold_K of every fold once any fold model is there."""
    path = Path(run_dir)
    metrics = store.read_json(metrics_path(path))
    if metrics is None:
        return []
    files = metrics.get(FILES)
    if not isinstance(files, dict):
        folds = metrics.get("folds")
        kept = isinstance(folds, int) and any(path.glob("fold_*.joblib"))
        models = [f"fold_{fold}.joblib" for fold in range(folds)] if kept else []
        files = dict.fromkeys([*PREDICTIONS, *models])
    return [name for name, size in files.items() if not _has_size(path / name, size)]


def _has_size(path: Path, size: int | None) -> bool:
    try:
        actual = path.stat().st_size
    except OSError:
        return False
    return size is None or actual == size


def _lacking_text(names: list[str]) -> str:
    return f"{', '.join(names)} missing or not as written"


def up_to_date(run_dir: str | os.PathLike, settings: dict, inputs: list[Path], log=print) -> bool:
    """True (and says so) when the run stands: whole, made with these settings from these
    inputs."""
    why = store.up_to_date(metrics_path(run_dir), stored_settings(run_dir), settings, inputs)
    lacking = missing_files(run_dir) if why is None else []
    why = f"incomplete: {_lacking_text(lacking)}" if lacking else why
    if why is None:
        log(f"{run_dir} is up to date: nothing to redo.")
        return True
    if Path(run_dir).exists():
        log(f"{run_dir} is out of date ({why}): redoing it.")
    return False


# ----------------------------------------------------------------------------------------------
# Whether a finished run still stands, for the stages that take runs they cannot redo (blend)


def stale_reason(run_dir: str | os.PathLike) -> str | None:
    """Why a finished run no longer stands by the rules make follows, or None when it does:
    made with its stage's method version, whole, newer than each of its inputs, and each input
    in turn newer than its own (a feature file than its arrays, the arrays than the sources
    stamp make rewrites when an image changes, a head run than its inputs)."""
    path = Path(run_dir)
    settings = stored_settings(path)
    if settings is None:
        return "not a finished run"
    stage, inputs = _recorded_inputs(path, settings)
    wanted = {**settings, "method_version": config.method_version(stage)} if stage else settings
    why = _stands(metrics_path(path), settings, wanted, inputs)
    lacking = missing_files(path) if why is None else []
    why = f"incomplete: {_lacking_text(lacking)}" if lacking else why
    for upstream in inputs:
        why = why or _upstream_reason(upstream)
    return why


def _recorded_inputs(path: Path, settings: dict) -> tuple[str | None, list[Path]]:
    """The stage that made a run and the inputs it checked (its runs.up_to_date), from the
    settings it recorded; (None, []) for a run of no known stage."""
    if "feature_files" in settings:  # a head (train.py)
        return "train", [Path(p) for p in settings["feature_files"]] + _version("train")
    if "head_run" in settings:  # fine-tuning (finetune/stage.py)
        arrays = config.arrays_dir_in(path.parent.parent, settings["input_size"])
        inputs = [metrics_path(settings["head_run"]), arrays / config.ARRAYS_MANIFEST]
        weights = str(settings.get("weights", ""))
        if weights.startswith("file:"):  # file:<path>:<size>:<mtime>
            inputs.append(Path(weights.removeprefix("file:").rsplit(":", 2)[0]))
        return "finetune", inputs + _version("finetune")
    if "runs" in settings:  # a blend (blend.py)
        return "blend", [metrics_path(p) for p in settings["runs"]] + _version("blend")
    return None, []


def _version(stage: str) -> list[Path]:
    return [config.method_version_file(stage)]


def _stands(output: Path, stored: dict | None, wanted: dict, inputs: list[Path]) -> str | None:
    """store.up_to_date, with a missing input named (make would stop at it too)."""
    missing = [str(p) for p in inputs if not Path(p).exists()]
    if missing:
        return f"inputs are missing: {', '.join(missing)}"
    return store.up_to_date(output, stored, wanted, inputs)


def _upstream_reason(path: Path) -> str | None:
    """Why an input of a run no longer stands by make's rule for it, or None."""
    if path.name == METRICS:  # another run (a fine-tuning run's head, a blend's runs)
        why = stale_reason(path.parent)
        return None if why is None else f"{path.parent} is out of date ({why})"
    if path.suffix == ".h5":  # a feature file: made from the arrays of its input size
        from dogscats.features import arrays_manifest_of

        manifest = arrays_manifest_of(path)
        if manifest is None:  # not made by `features` (no input size): nothing upstream
            return None
        why = _stands(path, {}, {}, [manifest])
        return f"{path}: {why}" if why else _upstream_reason(manifest)
    if path.name == config.ARRAYS_MANIFEST and path.parent.parent.name == "arrays":
        stamp = config.sources_stamp_in(path.parent.parent.parent)  # rewritten by make
        why = _stands(path, {}, {}, [stamp]) if stamp.exists() else None
        return f"{path}: {why} (an image was added, removed or replaced)" if why else None
    return None
