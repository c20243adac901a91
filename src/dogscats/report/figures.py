"""The report's plots, each a PNG data URI (the page embeds them and opens offline).

matplotlib's object API (Figure, not pyplot): no global state and no display backend, so the
report runs the same on a headless machine.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve

from dogscats.report.table import RunRow

DPI = 110
FONT = 10.5  # points; the PNGs are shown at their own size, so this is the size on screen
PANEL = (5.6, 3.9)  # inches: two panels side by side fit a 1366-pixel laptop screen
FLOOR = 1e-7  # per-image losses below this share the first bar of the loss histogram
GOLD, BLUE, GREY = "#d08c00", "#2a6fb0", "#888888"


def _figure(size: tuple[float, float] = PANEL) -> Figure:
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    return figure


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=FONT + 1.5, loc="left")
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.tick_params(labelsize=FONT - 1)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def data_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> str:
    """Reliability diagram of the out-of-fold predictions: mean P(dog) against the share of
    dogs per bin, with each bin's image count (most images sit in the two end bins)."""
    figure = _figure()
    ax = figure.add_subplot()
    edges = np.linspace(0, 1, bins + 1)
    share, mean_p = calibration_curve(y, p, n_bins=bins, strategy="uniform")
    # Bins as calibration_curve makes them (right edges inside), to print each point's count.
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=bins)
    ax.plot([0, 1], [0, 1], color=GREY, lw=1, ls="--", label="perfectly calibrated")
    ax.plot(mean_p, share, "o-", color=BLUE, label="out-of-fold")
    for x, s, n in zip(mean_p, share, counts[counts > 0]):
        ax.annotate(
            f"{n}",
            (x, s),
            textcoords="offset points",
            xytext=(0, 9),
            ha="center",
            fontsize=FONT - 2,
            color="#444",
        )
    ax.set_xlim(-0.06, 1.06)
    ax.set_ylim(-0.08, 1.14)
    ax.legend(fontsize=FONT - 1, loc="lower right", frameon=False)
    _style(
        ax,
        "Calibration (images per bin above points)",
        "mean predicted P(dog) in bin",
        "share of dogs in bin",
    )
    return data_uri(figure)


def loss_histogram(losses: np.ndarray) -> str:
    """Per-image out-of-fold log loss on a log axis: the bulk near 0 and the few costly ones."""
    figure = _figure()
    ax = figure.add_subplot()
    low = max(float(losses.min()), FLOOR)
    edges = np.geomspace(low, max(float(losses.max()), low * 10), 40)
    ax.hist(np.clip(losses, low, None), bins=edges, color=BLUE)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axvline(losses.mean(), color=GOLD, lw=2, label=f"mean = log loss {losses.mean():.4f}")
    ax.axvline(np.log(2), color=GREY, lw=1, ls="--", label="wrong side of 0.5 (ln 2)")
    ax.set_ylim(0.7, ax.get_ylim()[1] * 12)  # headroom: the legend sits above the bars
    ax.legend(fontsize=FONT - 1, frameon=False, loc="upper left")
    _style(
        ax,
        "Per-image out-of-fold log loss",
        "log loss of one image (below 1e-7: first bar)",
        "images",
    )
    return data_uri(figure)


def test_histogram(p: np.ndarray) -> str:
    figure = _figure()
    ax = figure.add_subplot()
    ax.hist(p, bins=np.linspace(0, 1, 41), color=BLUE)
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    _style(ax, f"Test predictions ({len(p)} images, unclipped)", "P(dog)", "images")
    return data_uri(figure)


def finetune_curves(histories: dict[int, pd.DataFrame], to_beat: dict[int, float]) -> str:
    """Training (dashed) and validation (solid) loss per epoch, one colour per fold; dotted:
    the fold's head on the same validation rows, the loss fine-tuning has to beat."""
    figure = _figure((PANEL[0] * 2, PANEL[1]))
    ax = figure.add_subplot()
    for fold, history in sorted(histories.items()):
        epoch = history["epoch"].to_numpy() + 1
        colour = f"C{fold % 10}"
        if "loss" in history:
            ax.plot(epoch, history["loss"], ls="--", color=colour, alpha=0.8)
        ax.plot(epoch, history["val_loss"], "o-", color=colour, label=f"fold {fold}")
        if fold in to_beat:
            ax.hlines(to_beat[fold], epoch.min(), epoch.max(), colors=colour, ls=":", lw=1.5)
    ax.plot([], [], ls="--", color=GREY, label="training loss")
    ax.plot([], [], "o-", color=GREY, label="validation loss")
    if to_beat:
        ax.plot([], [], ls=":", color=GREY, label="head (to beat)")
    figure.legend(fontsize=FONT - 1, frameon=False, loc="outside right upper")
    ax.xaxis.get_major_locator().set_params(integer=True)
    _style(ax, "Loss per epoch, one colour per fold", "epoch", "log loss")
    return data_uri(figure)


def comparison(rows: list[RunRow]) -> str:
    """Out-of-fold log loss of every run with its spread over folds, best at the top."""
    height = 1.4 + 0.42 * len(rows)
    figure = _figure((PANEL[0] * 2, height))
    ax = figure.add_subplot()
    ordered = rows[::-1]  # y = 0 is the bottom row; the best run goes on top
    y = np.arange(len(ordered))
    losses = [row.log_loss for row in ordered]
    spread = [row.log_loss_std for row in ordered]
    ax.errorbar(
        losses,
        y,
        xerr=spread,
        fmt="o",
        color=BLUE,
        ecolor=GREY,
        capsize=4,
        label="out-of-fold log loss ± std over folds",
    )
    tested = [(i, row.test_log_loss) for i, row in enumerate(ordered)]
    tested = [(i, loss) for i, loss in tested if loss is not None]
    if tested:
        ax.plot(
            [loss for _, loss in tested],
            [i for i, _ in tested],
            "D",
            color=GOLD,
            label="test log loss (LABELS)",
        )
    figure.legend(fontsize=FONT - 1, frameon=False, loc="outside upper right", ncols=2)
    short = [row.label for row in ordered]
    # Runs that differ only in what the short label leaves out are shown by their full names.
    names = [row.name if short.count(label) > 1 else label for row, label in zip(ordered, short)]
    ax.set_yticks(y, names, fontsize=FONT)
    ax.set_ylim(-0.6, len(ordered) - 0.4)
    _style(ax, "", "log loss (lower is better)", "")
    ax.grid(axis="y", alpha=0)
    return data_uri(figure)
