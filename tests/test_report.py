"""make report: the table's numbers, the most-wrong gallery and list, test scores as `make score`
computes them, and a page that needs nothing from the network."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, write_kaggle_dataset

from dogscats import arrays, cli, config, report, runs, submission

SIZE = 32
K = 5


def fake_run(data_dir, name, seed, metrics_extra=None, extras=None, submit=True):
    """A run folder of random but fixed predictions over the dataset's arrays, with its
    submission written by the real submission stage."""
    rng = np.random.default_rng(seed)
    _, index = arrays.load_split(config.arrays_dir(data_dir, SIZE), "train")
    _, test_index = arrays.load_split(config.arrays_dir(data_dir, SIZE), "test")
    y = index["label"].to_numpy()
    folds = np.arange(len(y)) % 2
    oof = np.clip(np.where(y == 1, 0.8, 0.2) + rng.normal(0, 0.3, len(y)), 0.001, 0.999)
    test = rng.uniform(0.01, 0.99, len(test_index))
    fold_scores = [
        {"log_loss": submission.log_loss(y[folds == f], oof[folds == f]), "accuracy": 0.5 + f / 4}
        for f in (0, 1)
    ]
    metrics = {
        "log_loss": submission.log_loss(y, oof),
        "accuracy": float(np.mean((oof > 0.5) == (y == 1))),
        "head": "logreg",
        "tta": "flip",
        "feature_files": ["x/efficientnet_lite0.flip.h5", "x/resnet50.flip.h5"],
        "fold_scores": fold_scores,
        "wall_s": 75.0,
        **(metrics_extra or {}),
    }
    predictions = runs.Predictions(
        index["id"].to_numpy(), y, folds, oof, test_index["id"].to_numpy(), test
    )
    run_dir = runs.write_run(
        config.models_dir(data_dir) / name, predictions, metrics, extras=extras
    )
    if submit:
        submission.write_submission(
            run_dir,
            data_dir / "sample_submission.csv",
            config.submission_path(data_dir, name),
            log=lambda _: None,
        )
    return run_dir


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data_dir = write_kaggle_dataset(tmp_path_factory.mktemp("report") / "comp", 12, 8, 40)
    arrays.preprocess(data_dir, SIZE, workers=1, progress=False)
    first = fake_run(data_dir, "efficientnet_lite0+resnet50__logreg__flip", seed=1)
    second = fake_run(data_dir, "efficientnet_lite0+resnet50__keras__flip", seed=2)
    history = tmp_path_factory.mktemp("history")
    extras = {}
    for fold in (0, 1):  # the columns Keras's CSVLogger writes
        path = history / f"{fold}.csv"
        epochs = pd.DataFrame({"epoch": [0, 1, 2], "loss": [0.3, 0.2, 0.1]})
        epochs.assign(val_loss=[0.25, 0.2, 0.22], learning_rate=1e-4).to_csv(path, index=False)
        extras[runs.HISTORY.format(fold=fold)] = path
    tuned = {"head": "finetune", "backbone": "efficientnet_lite0", "blocks": 1, "augment": "flip"}
    third = fake_run(
        data_dir, "efficientnet_lite0__finetune1__augflip__flip", 3, tuned, extras, False
    )
    yield data_dir, [first, second, third]
    shutil.rmtree(config.dataset_dir(data_dir), ignore_errors=True)  # outputs live in the repo
    shutil.rmtree(config.submissions_dir(data_dir), ignore_errors=True)
    shutil.rmtree(config.reports_dir(data_dir), ignore_errors=True)


def table_rows(html: str) -> list[str]:
    body = html.split("<table>", 1)[1].split("</table>", 1)[0]
    return re.findall(r"(<tbody[^>]*>.*?)</tbody>", body)  # one per run: numbers, then names


def section(html: str, title: str) -> str:
    return html.split(f"<h2>{title}", 1)[1].split("<h2>", 1)[0]


def tile_ids(html: str) -> list[str]:
    return re.findall(r'<figure class="tile[^"]*">.*?<figcaption><b>([^<]+)</b>', html)


def test_the_table_lists_every_run_with_its_numbers_best_first(dataset, tmp_path):
    data_dir, run_dirs = dataset
    labels = data_dir / "test_labels.csv"
    page = report.write_report(data_dir, tmp_path / "index.html", k=K, labels=labels, log=print)
    html = page.read_text()
    read = [runs.read_run(d) for d in run_dirs]
    expected = sorted(read, key=lambda r: r.metrics["log_loss"])
    rows = table_rows(html)
    assert len(rows) == 3
    for row_html, run in zip(rows, expected):
        name = run.path.name
        run_cell = re.search(r"<code>RUN=(.*?)</code>", row_html).group(1)
        assert run_cell.replace("<wbr>", "") == name
        folds = [s["log_loss"] for s in run.metrics["fold_scores"]]
        assert f'{run.metrics["log_loss"]:.5f} <span class="sd">± {np.std(folds):.5f}' in row_html
        assert f'{run.metrics["accuracy"]:.4f} <span class="sd">± 0.1250' in row_html
        csv = config.submission_path(data_dir, name)
        if csv.is_file():
            scored = submission.score(csv, labels)  # what `make score` prints
            assert f">{scored['log_loss']:.5f}<" in row_html
            assert f">{scored['accuracy']:.4f}<" in row_html
            clip = submission.choose_clip(run.oof["label"], run.oof["pred"])
            assert f">{clip:.4f}<" in row_html and f"/{csv.name}</code>" in row_html
            assert ">1:15<" in row_html  # wall time
        else:
            assert "no submission yet" in row_html
    assert "<td>efficientnet_lite0 + resnet50</td>" in "".join(rows)


def test_a_blend_shows_how_many_runs_it_blends_and_weights(dataset):
    data_dir, _ = dataset
    weights = {"a": 0.6, "b": 0.0, "c": 0.3}
    blend_dir = fake_run(
        data_dir, "blend__3runs-0123abcd", 4, {"head": "blend", "weights": weights}
    )
    try:
        row = report.table.read_row(data_dir, blend_dir, labels=None)
        assert (row.backbones, row.head) == (["3 runs, 2 weighted"], "blend")
    finally:
        shutil.rmtree(blend_dir)
        config.submission_path(data_dir, blend_dir.name).unlink()


def test_test_log_loss_is_the_score_functions(dataset):
    data_dir, run_dirs = dataset
    rows = report.table.read_rows(data_dir, data_dir / "test_labels.csv")
    for row in rows:
        csv = config.submission_path(data_dir, row.name)
        if csv.is_file():
            assert (
                row.test_log_loss
                == submission.score(csv, data_dir / "test_labels.csv")["log_loss"]
            )
        else:
            assert row.test_log_loss is None and row.submission is None


def test_gallery_and_list_hold_exactly_the_top_k_out_of_fold_losses(dataset, tmp_path):
    data_dir, run_dirs = dataset
    name = run_dirs[1].name
    page = report.write_report(data_dir, tmp_path / "index.html", run=name, k=K, log=print)
    html = page.read_text()
    oof = runs.read_run(run_dirs[1]).oof
    p = np.clip(oof["pred"].to_numpy(), 1e-15, 1 - 1e-15)
    losses = -np.where(oof["label"] == 1, np.log(p), np.log(1 - p))
    top = oof["id"].to_numpy()[np.argsort(-losses)[:K]].tolist()
    wrong = section(html, "Most wrong")
    assert tile_ids(wrong) == top
    assert wrong.count('src="data:image/jpeg;base64,') == K  # every one has its thumbnail
    listed = config.most_wrong_path(page).read_text().splitlines()
    assert [line for line in listed if not line.startswith("#")] == [f"{i}.jpg" for i in top]
    assert name in "".join(line for line in listed if line.startswith("#"))

    test = runs.read_run(run_dirs[1]).test
    closest = test["id"].to_numpy()[np.argsort(np.abs(test["pred"] - 0.5))[:K]].tolist()
    assert tile_ids(section(html, "Least certain")) == closest
    assert (
        'class="run picked"' in [r for r in table_rows(html) if name in r.replace("<wbr>", "")][0]
    )


def test_the_page_is_self_contained(dataset, tmp_path):
    data_dir, run_dirs = dataset
    out = tmp_path / "index.html"
    html = report.write_report(data_dir, out, run=run_dirs[0].name, k=K, log=print).read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert html.count('src="data:image/png;base64,') == 4  # comparison + three run plots


def test_a_fine_tuning_run_shows_its_curves(dataset, tmp_path):
    data_dir, run_dirs = dataset
    assert set(runs.read_run(run_dirs[2]).histories()) == {0, 1}
    html = report.write_report(
        data_dir, tmp_path / "index.html", run=run_dirs[2].name, k=K, log=print
    ).read_text()
    assert "Fine-tuning curves" in html and html.count("data:image/png;base64,") == 5
    assert "<td>fine-tune 1 block</td>" in html


def test_bad_choices_are_one_clear_line(dataset, tmp_path, capsys):
    data_dir, _ = dataset
    out = ["--data-dir", str(data_dir), "--out", str(tmp_path / "r.html")]
    assert cli.main(["report", *out, "--run", "nope"]) == 2
    err = capsys.readouterr().err
    assert "RUN='nope' is not a finished run" in err and "__keras__flip" in err
    assert cli.main(["report", *out, "--labels", str(tmp_path / "none.csv")]) == 2
    assert "none.csv: no such file" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
    assert cli.main(["report", "--data-dir", str(tmp_path / "empty")]) == 2
    assert "no finished run" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["default", "given", "absent"])
def test_make_report_passes_labels_given_or_found(dataset, tmp_path, case):
    data_dir, _ = dataset
    data_dir = tmp_path if case == "absent" else data_dir  # no test_labels.csv there
    given = [f"LABELS={tmp_path}/nothing.csv"] if case == "given" else []
    argv = ["make", "-n", "-C", str(REPO), "report", f"DATA_DIR={data_dir}", "RUN=x", "K=7"]
    out = subprocess.run([*argv, *given], capture_output=True, text=True).stdout
    assert f"--out {config.report_path(data_dir).relative_to(REPO)} --k 7" in out
    assert "--run 'x'" in out
    # A labels file given is passed on even when missing (the report refuses it by name); the
    # default one only when it exists.
    expected = {
        "default": f"--labels '{data_dir}/test_labels.csv'",
        "given": f"--labels '{tmp_path}/nothing.csv'",
        "absent": None,
    }[case]
    assert (expected in out) if expected else ("--labels" not in out)
