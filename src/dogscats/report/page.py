"""The report as one self-contained HTML page: inline CSS, images as data URIs, no script.

Hand-written HTML (escaped with the standard library's html.escape): the page is a table, a
few images and two grids, and a template engine would be one more dependency for that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from dogscats import config
from dogscats.report.gallery import Tile
from dogscats.report.table import RunRow

CSS = """
body { font: 16px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       margin: 0; background: #fafafa; }
main { max-width: 1320px; margin: 0 auto; padding: 18px 24px 48px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 21px; margin: 34px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p.meta, p.note { color: #555; margin: 4px 0; }
code { font: 13px/1.3 ui-monospace, Menlo, Consolas, monospace; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 14.5px; background: #fff; width: 100%; }
th, td { padding: 6px 9px; border-bottom: 1px solid #e4e4e4; text-align: left;
         vertical-align: top; }
th { background: #f0f0f0; position: sticky; top: 0; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody.run tr:first-child td { border-bottom: 0; padding-bottom: 1px; }
tr.names td { color: #666; font-size: 13px; padding-top: 0; overflow-wrap: anywhere; }
tbody.picked { background: #fff6dc; }
.sd { color: #777; font-size: 13px; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr));
           gap: 12px; }
.figures img, img.wide { max-width: 100%; height: auto; background: #fff;
                         border: 1px solid #e4e4e4; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(152px, 1fr));
           gap: 10px; }
figure.tile { margin: 0; background: #fff; border: 1px solid #ddd; padding: 4px;
              text-align: center; }
figure.tile.flagged { border: 2px solid #c62828; padding: 3px; }
figure.tile img { width: 100%; max-width: 150px; height: auto; display: block;
                  margin: 0 auto; }
figure.tile .missing { height: 150px; line-height: 150px; color: #999; font-size: 13px; }
figcaption { font-size: 13px; line-height: 1.3; margin-top: 3px; }
figcaption b { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
"""


@dataclass
class Page:
    """What the page shows; stage.write_report fills it."""

    dataset: str
    data_dir: str
    labels: str | None
    rows: list[RunRow]
    picked: RunRow
    comparison: str  # data URI
    run_figures: list[str]  # data URIs
    curves: str | None  # data URI of the fine-tuning curves, for fine-tuning runs
    wrong: list[Tile]
    unsure: list[Tile]
    exclude_file: str
    arrays_note: str | None = None  # why thumbnails are missing, if they are
    generated: str = ""
    notes: list[str] = field(default_factory=list)


def shown_path(path: str | os.PathLike) -> str:
    """A path as make prints it: relative to the project when under it."""
    absolute = Path(os.path.abspath(path))
    if absolute.is_relative_to(config.PROJECT_ROOT):
        return str(absolute.relative_to(config.PROJECT_ROOT))
    return str(path)


def _breakable(name: str) -> str:
    """A run name that may wrap after its `+` and `__` separators."""
    return escape(name).replace("+", "+<wbr>").replace("__", "<wbr>__")


def _num(value: float | None, digits: int, spread: float | None = None) -> str:
    if value is None:
        return '<td class="num">—</td>'
    text = f"{value:.{digits}f}"
    if spread is not None and spread == spread:  # NaN: no per-fold scores recorded
        text += f' <span class="sd">± {spread:.{digits}f}</span>'
    return f'<td class="num">{text}</td>'


def _wall(seconds: float | None) -> str:
    if seconds is None:
        return '<td class="num">—</td>'
    minutes, secs = divmod(int(round(seconds)), 60)
    return f'<td class="num">{minutes}:{secs:02d}</td>'


def _table(page: Page) -> str:
    """One row of numbers per run, and under it a line with its long names (run folder for
    RUN=, submission file), so that no column has to be wide enough for them."""
    head = (
        "<thead><tr><th>#</th><th>backbones</th><th>head</th><th>TTA</th><th>folds</th>"
        "<th>OOF log loss ± folds</th><th>OOF accuracy ± folds</th><th>clip</th>"
        "<th>test log loss</th><th>test accuracy</th>"
        "<th title=\"the run's own step (train, finetune or blend), not the arrays and "
        'features it read">step time (m:s)</th></tr></thead>'
    )
    body = []
    for rank, row in enumerate(page.rows, 1):
        picked = " picked" if row is page.picked else ""
        submission = (
            f"submission <code>{escape(shown_path(row.submission))}</code>"
            if row.submission is not None
            else "no submission yet"
        )
        body.append(
            f'<tbody class="run{picked}"><tr><td class="num">{rank}</td>'
            f"<td>{' + '.join(escape(b) for b in row.backbones)}</td>"
            f"<td>{escape(row.head)}</td><td>{escape(row.tta)}</td>"
            f'<td class="num">{row.folds}</td>'
            + _num(row.log_loss, 5, row.log_loss_std)
            + _num(row.accuracy, 4, row.accuracy_std)
            + _num(row.clip, 4)
            + _num(row.test_log_loss, 5)
            + _num(row.test_accuracy, 4)
            + _wall(row.wall_s)
            + '</tr><tr class="names"><td></td><td colspan="10">'
            f"<code>RUN={_breakable(row.name)}</code> · {submission}</td></tr></tbody>"
        )
    return f'<div class="scroll"><table>{head}{"".join(body)}</table></div>'


def _tiles(tiles: list[Tile]) -> str:
    out = []
    for tile in tiles:
        flagged = " flagged" if tile.flagged else ""
        image = (
            f'<img src="{tile.image}" alt="{escape(tile.id)}" width="150" height="150">'
            if tile.image
            else '<div class="missing">not in arrays</div>'
        )
        caption = "<br>".join(escape(line) for line in tile.caption)
        out.append(
            f'<figure class="tile{flagged}">{image}'
            f"<figcaption><b>{escape(tile.id)}</b><br>{caption}</figcaption></figure>"
        )
    return f'<div class="gallery">{"".join(out)}</div>'


def render(page: Page) -> str:
    picked = page.picked
    labels = (
        f"test scores against <code>{escape(page.labels)}</code> (as <code>make score</code>)"
        if page.labels
        else "no labels file: test columns empty (give <code>LABELS=</code>)"
    )
    figures = "".join(f'<img src="{uri}" alt="plot">' for uri in page.run_figures)
    curves = (
        f'<h3>Fine-tuning curves</h3><img class="wide" src="{page.curves}" alt="curves">'
        if page.curves
        else ""
    )
    arrays_note = f'<p class="note">{escape(page.arrays_note)}</p>' if page.arrays_note else ""
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in page.notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dogscats report: {escape(page.dataset)}</title>
<style>{CSS}</style></head>
<body><main>
<h1>dogscats report: {escape(page.dataset)}</h1>
<p class="meta"><code>{escape(page.data_dir)}</code> · {len(page.rows)} run(s) · {labels}
· written {escape(page.generated)}</p>
{notes}
<h2>Runs, best out-of-fold log loss first</h2>
<p class="note">Out-of-fold (OOF) scores are unclipped, over all train images; ± is the
standard deviation over folds. The clip and the test scores are those of the run's submission
file. The highlighted run is the one shown below.</p>
{_table(page)}
<h2>Backbones and heads</h2>
<img class="wide" src="{page.comparison}" alt="comparison of runs">
<h2>Run <code>{_breakable(picked.name)}</code></h2>
<p class="note">Choose another with <code>make report RUN=&lt;run&gt;</code>.</p>
<div class="figures">{figures}</div>
{curves}
<h2>Most wrong: the {len(page.wrong)} train images with the highest out-of-fold loss</h2>
<p class="note">Red frame: the prediction is on the wrong side of 0.5. Mislabelled photos and
photos of neither a cat nor a dog stand out here. Their file names are in
<code>{
        escape(shown_path(page.exclude_file))
    }</code> (EXCLUDE format): delete the lines of the correctly
labelled ones, then pass it as <code>EXCLUDE=</code>.</p>
{arrays_note}
{_tiles(page.wrong)}
<h2>Least certain: the {len(page.unsure)} test images with P(dog) closest to 0.5</h2>
<p class="note">{
        "Red frame: on the wrong side of 0.5 by the labels file."
        if page.labels
        else "Give LABELS= to see their true labels."
    }</p>
{_tiles(page.unsure)}
</main></body></html>
"""
