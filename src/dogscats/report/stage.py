"""`make report`: read every run of a dataset, draw, write the page and the most-wrong list.

Never trains: it reads run folders (runs.py), submissions and image arrays, and writes only
under reports/<dataset>/ (config.report_path).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from dogscats import config, store, submission
from dogscats.report import figures, gallery, page, table

K = config.REPORT_IMAGES  # thumbnails per gallery (make's K)


def _check_labels(labels: str | os.PathLike | None) -> dict[str, int]:
    """The labels file's {id: label}, refused early with a clear line when unusable."""
    if labels is None:
        return {}
    path = Path(labels)
    if not path.is_file():
        raise FileNotFoundError(f"LABELS={labels}: no such file (an id,label CSV of test ids)")
    frame = pd.read_csv(path, dtype={"id": str})
    if not {"id", "label"} <= set(frame.columns):
        raise ValueError(f"LABELS={labels}: needs columns id,label; it has {list(frame.columns)}")
    return dict(zip(frame["id"], frame["label"].astype(int)))


def write_report(
    data_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    run: str | None = None,
    k: int = K,
    labels: str | os.PathLike | None = None,
    progress: bool = True,
    log=print,
    wait: bool = True,
) -> Path:
    """Write the dataset's report page (and most_wrong.txt beside it); return the page.
    Another report into the same folder is waited for (`wait` False: store.BusyError)."""
    out = Path(out or config.report_path(data_dir))
    with store.writer_lock(out.parent, "report", wait, log):
        return _write_report(data_dir, out, run, k, labels, progress, log)


def _write_report(data_dir, out: Path, run, k: int, labels, progress: bool, log) -> Path:
    if k < 1:
        raise ValueError(f"K must be at least 1. Received: {k}")
    truth = _check_labels(labels)
    folders = config.list_runs(config.models_dir(data_dir))
    if not folders:
        raise FileNotFoundError(
            f"no finished run in {config.models_dir(data_dir)}: run `make submission` "
            "(or `make train`) for this DATA_DIR first."
        )
    began = time.monotonic()
    bar = tqdm(total=len(folders) + 4, desc="report", unit="step", disable=not progress)
    with bar:
        bar.set_postfix_str("runs")
        rows = table.read_rows(data_dir, labels, progress=bar)
        picked = table.pick_run(rows, run)
        result = picked.run
        y, p = result.oof["label"].to_numpy(), result.oof["pred"].to_numpy()
        bar.set_postfix_str("plots")
        run_figures = [
            figures.calibration(y, p),
            figures.loss_histogram(submission.image_log_loss(y, p)),
            figures.test_histogram(result.test["pred"].to_numpy()),
        ]
        histories = result.histories()
        # The fold's head on the early-stopping rows (fine-tuning's fold_scores record it).
        scores = result.metrics.get("fold_scores", [])
        to_beat = {
            i: s["stop_head_log_loss"] for i, s in enumerate(scores) if "stop_head_log_loss" in s
        }
        curves = figures.finetune_curves(histories, to_beat) if histories else None
        bar.update(1)
        comparison = figures.comparison(rows)
        bar.update(1)
        bar.set_postfix_str("thumbnails")
        arrays_dir = gallery.thumbnail_arrays(data_dir)
        wrong = gallery.most_wrong(result, k)
        train_thumbs = gallery.Thumbnails(arrays_dir, "train")
        wrong_tiles = gallery.train_tiles(wrong, train_thumbs)
        unsure_tiles = gallery.test_tiles(
            gallery.least_certain(result, k), gallery.Thumbnails(arrays_dir, "test"), truth
        )
        bar.update(1)
        exclude = config.most_wrong_path(out)
        content = page.Page(
            dataset=config.dataset_key(data_dir),
            data_dir=os.path.abspath(os.fspath(data_dir)),
            labels=str(labels) if labels is not None else None,
            rows=rows,
            picked=picked,
            comparison=comparison,
            run_figures=run_figures,
            curves=curves,
            wrong=wrong_tiles,
            unsure=unsure_tiles,
            exclude_file=str(exclude),
            arrays_note=None
            if arrays_dir
            else "No image arrays for this DATA_DIR: run `make preprocess` for thumbnails.",
            generated=time.strftime("%Y-%m-%d %H:%M"),
        )
        store.write_text(exclude, gallery.exclude_list(wrong, train_thumbs, picked.name, out))
        store.write_text(out, page.render(content))
        bar.update(1)
    log(
        f"Wrote {out} ({len(rows)} run(s); run shown: {picked.name}) and {exclude} "
        f"in {time.monotonic() - began:.1f} s"
    )
    return out
