"""plan.py: the Makefile's paths and rules come from config's names, with the standard library."""

from __future__ import annotations

import shutil

import pytest
from conftest import plan_without_heavy_imports

from dogscats import config, plan


def lines(**variables) -> list[str]:
    return plan.plan(plan.Variables(**variables))


def value(name: str, **variables) -> str:
    (line,) = [line for line in lines(**variables) if line.startswith(f"{name} := ")]
    return line.split(" := ", 1)[1]


def test_paths_are_config_names(tmp_path):
    data_dir = str(tmp_path / "comp")
    run = config.head_run_name(["resnet50"], "keras", tta="flip")
    assert value("DS", data_dir=data_dir) == config.dataset_key(data_dir)
    assert value("RUN_DIR", data_dir=data_dir, backbones="resnet50", head="keras", tta="flip") == (
        str((config.models_dir(data_dir) / run).relative_to(config.PROJECT_ROOT))
    )
    files = value("FEATURE_FILES", data_dir=data_dir, backbones="offline", tta="flip").split()
    assert [f.rsplit("/", 1)[1] for f in files] == [
        f"efficientnet_lite{k}_{size}.flip.h5" for k, size in enumerate((288, 304, 330))
    ]


def test_each_feature_file_gets_its_arrays_and_recipe_variables():
    text = "\n".join(lines(backbones="inception_v3 resnet50"))
    for name, size in (("inception_v3", 299), ("resnet50", 224)):
        assert f"{name}.h5: features/data-" in text
        assert f"/arrays/{size}/manifest.json" in text
        assert f"{name}.h5: EXTRACT_BACKBONE := {name}" in text
    assert value("SIZES", backbones="inception_v3 resnet50") == "224 299"


def test_finetune_adds_its_backbone_and_names_its_flags():
    assert value("SIZES", backbones="resnet50", backbone="efficientnet_lite1") == "224"
    assert value("SIZES", backbones="resnet50", backbone="efficientnet_lite1", finetune=True) == (
        "224 240"
    )
    hp = {"learning_rate": "1e-4", "patience": "2", "epochs": ""}
    assert value("FT_FLAGS", hyperparameters=hp) == "--learning-rate 1e-4 --patience 2"
    assert value("FT_RUN_DIR", hyperparameters=hp).endswith("__augflip__lr1e-4__pat2")


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"head": "nonsense"}, "HEAD must be one of logreg, keras, zeroshot, finetune"),
        ({"tta": "maybe"}, "TTA must be one of none, flip"),
        ({"precision": "fp8"}, "PRECISION must be one of float32, bfloat16"),
        ({"folds": "abc"}, "FOLDS must be a whole number >= 2"),
        ({"folds": "1"}, "FOLDS must be a whole number >= 2. Received: '1'"),
        ({"clip": "0.7"}, r"CLIP must be 'auto' or a number in (0, 0.5), e.g. 0.005"),
        ({"clip": "0.5"}, "CLIP must be 'auto' or a number in (0, 0.5)"),
        ({"clip": "0"}, "CLIP must be 'auto' or a number in (0, 0.5)"),
        ({"clip": "-1"}, "CLIP must be 'auto' or a number in (0, 0.5)"),
        ({"clip": "abc"}, "Received: 'abc'"),
        ({"no_wait": "yes"}, "NO_WAIT must be 1 (refuse), 0 or empty (wait). Received: 'yes'"),
        ({"clip": "nan"}, "Received: 'nan'"),
        ({"weights": "nowhere.h5"}, "WEIGHTS must be one of imagenet, random or the path"),
        ({"batch_size": "0"}, "BATCH_SIZE must be a whole number >= 1"),
        ({"workers": "two"}, "WORKERS must be a whole number >= 1"),
        ({"runtime": "fast"}, "RUNTIME must be one of auto, keras, litert"),
        ({"runtime": "litert", "precision": "bfloat16"}, "PRECISION=bfloat16 needs RUNTIME=keras"),
        ({"hyperparameters": {"learning_rate": "fast"}}, "FT_LR (peak Adam learning rate)"),
        ({"hyperparameters": {"dropout": "1.5"}}, "FT_DROPOUT (dropout before the dense head)"),
        ({"hyperparameters": {"epochs": "2.5"}}, "FT_EPOCHS (most epochs per fold) must be a"),
        ({"hyperparameters": {"stop_fraction": "1"}}, "must be a number in (0, 1). Received: '1'"),
        ({"hyperparameters": {"stop_fraction": "0"}}, "FT_STOP (share of each fold's training"),
        ({"backbones": "nope"}, "Unknown backbone 'nope'"),
        ({"exclude": "no/such/list.txt"}, "EXCLUDE=no/such/list.txt: no such file"),
    ],
)
def test_a_bad_value_becomes_one_plan_error(variables, message):
    text = plan.as_make(plan.Variables(**variables))
    assert text.startswith("PLAN_ERROR := ") and message in text


def test_the_plan_needs_only_the_standard_library():
    heavy = {"numpy", "pandas", "tensorflow", "keras", "h5py", "sklearn"}
    assert "RUN_DIR := features/data-" in plan_without_heavy_imports([], heavy)


def test_exclude_names_the_run_by_its_content(tmp_path):
    listed = tmp_path / "mislabelled v2.txt"
    listed.write_text("cat.1.jpg\n")
    run = value("RUN_DIR", backbones="resnet50", exclude=str(listed))
    digest = config.file_digest(listed)[:8]
    assert run.endswith(f"/resnet50__logreg__ssr_l2__excl-mislabelled-v2-{digest}")
    assert value("EXCLUDE_FILE", exclude=str(listed)) == str(listed)
    assert value("RUN_DIR", backbones="resnet50").endswith("/resnet50__logreg__ssr_l2")
    # Case 2 of #23: another list of the same file name is another run; the same content
    # elsewhere is the same run.
    (tmp_path / "elsewhere").mkdir()
    other, copy = tmp_path / "elsewhere" / listed.name, tmp_path / "copy.txt"
    other.write_text("dog.3.jpg\n")
    copy.write_text("cat.1.jpg\n")
    assert value("RUN_DIR", backbones="resnet50", exclude=str(other)) != run
    assert value("RUN_DIR", backbones="resnet50", exclude=str(copy)).endswith(f"-{digest}")


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"data_dir": "/tmp/it's/comp"}, "DATA_DIR=/tmp/it's/comp: the character ' (U+0027)"),
        ({"data_dir": "/tmp/a:b"}, "DATA_DIR=/tmp/a:b: the character : (U+003A)"),
        ({"data_dir": "/tmp/a#b"}, "DATA_DIR=/tmp/a\\#b: the character \\# (U+0023)"),
        ({"data_dir": "/tmp/a(b)"}, "DATA_DIR=/tmp/a(b): the character ( (U+0028)"),
        ({"data_dir": "/tmp/a b"}, "DATA_DIR=/tmp/a b: the character space (U+0020)"),
        ({"runs": "a__logreg b=c"}, "RUNS=b=c: the character = (U+003D)"),
        ({"weights": "/tmp/w;1.h5"}, "WEIGHTS=/tmp/w;1.h5: the character ; (U+003B)"),
        ({"labels": "/tmp/l%.csv"}, "LABELS=/tmp/l%.csv: the character % (U+0025)"),
        ({"backbones": "savedmodel:/x&y:224"}, "BACKBONES=savedmodel:/x&y:224: the character &"),
        ({"backbone": "savedmodel:/x$y:224"}, "BACKBONE=savedmodel:/x$$y:224: the character $$"),
        ({"exclude": "/tmp/it's.txt"}, "EXCLUDE=/tmp/it's.txt: the character ' (U+0027)"),
        ({"submission": "/tmp/it's.csv"}, "SUBMISSION=/tmp/it's.csv: the character '"),
        ({"weights_dir": "/tmp/it's"}, "WEIGHTS_DIR=/tmp/it's: the character ' (U+0027)"),
    ],
)
def test_a_path_make_or_the_shell_cannot_carry_is_one_plan_error(variables, message):
    """Case 5 of #23: checked before anything reads the path (no such file comes second)."""
    text = plan.as_make(plan.Variables(**variables))
    assert text.startswith("PLAN_ERROR := ") and message in text
    assert "cannot be carried by make and the shell in a path" in text
    assert plan.LINE_BREAK not in text  # one line


def test_paths_make_carries_pass(tmp_path):
    listed = tmp_path / "list v2.txt"  # EXCLUDE is only ever passed quoted: a space is fine
    listed.write_text("cat.1.jpg\n")
    for variables in (
        {"data_dir": str(tmp_path / "kaggle.v2" / "dogs-vs-cats_2+x@y")},
        {"exclude": str(listed), "runs": "a__logreg ../b/c__keras"},
        {"backbones": "resnet50", "weights_dir": str(tmp_path / "w x")},
    ):
        assert not plan.as_make(plan.Variables(**variables)).startswith("PLAN_ERROR")
    plan._check_paths(plan.Variables(backbones="hub:kaggle://keras/dinov2/2 savedmodel:x/y:224"))


def test_a_run_lacking_a_file_it_wrote_is_remade(models_of_a_fresh_dataset):
    """Case 6 of #23: a fold model deleted from a finished run makes its rule run again."""
    import numpy as np

    from dogscats import runs

    data_dir, models = models_of_a_fresh_dataset
    run = models / value("RUN_DIR", data_dir=data_dir, backbones="resnet50").rsplit("/", 1)[1]
    predictions = runs.Predictions(
        np.array(["cat.1", "dog.1"]),
        np.array([0, 1]),
        np.array([0, 1]),
        np.array([0.2, 0.7]),
        np.array([1]),
        np.array([0.5]),
    )
    runs.write_run(run, predictions, {"settings": {}}, models=[{"fold": 0}, {"fold": 1}])
    force = f"{runs.metrics_path(run).relative_to(config.PROJECT_ROOT)}: FORCE"
    assert force not in lines(data_dir=data_dir, backbones="resnet50")
    (run / "fold_1.joblib").unlink()
    assert force in lines(data_dir=data_dir, backbones="resnet50")
    assert runs.missing_files(run) == ["fold_1.joblib"]


def test_norm_names_logreg_runs_only_and_never_the_head_fine_tuning_starts_from():
    assert value("RUN_DIR", backbones="resnet50", norm="standard").endswith("/resnet50__logreg")
    assert value("HEAD_NORM", backbones="resnet50", norm="standard") == "standard"
    assert value("RUN_DIR", backbones="resnet50", head="keras").endswith("/resnet50__keras")
    assert value("HEAD_NORM", head="keras") == "standard"
    assert value("FT_HEAD_RUN", backbone="resnet50").endswith("/resnet50__logreg")


@pytest.fixture
def models_of_a_fresh_dataset(tmp_path):
    """The models folder of a data set of its own (under features/), removed afterwards."""
    data_dir = str(tmp_path / "comp")
    yield data_dir, config.models_dir(data_dir)
    shutil.rmtree(config.dataset_dir(data_dir), ignore_errors=True)


def test_blend_takes_runs_by_name_or_else_every_finished_run(models_of_a_fresh_dataset):
    data_dir, models = models_of_a_fresh_dataset
    for name in ("a__logreg", "b__keras", "c__logreg", "blend__2runs-00000000"):
        (models / name).mkdir(parents=True)
        if name != "c__logreg":  # c is not finished
            (models / name / "metrics.json").write_text("{}")
    dirs = value("BLEND_RUN_DIRS", data_dir=data_dir).split()
    assert [d.rsplit("/", 1)[1] for d in dirs] == ["a__logreg", "b__keras"]
    blend_dir = value("BLEND_DIR", data_dir=data_dir)
    assert blend_dir.endswith("/" + config.blend_run_name(["a__logreg", "b__keras"]))
    named = value("BLEND_RUN_DIRS", data_dir=data_dir, runs="c__logreg a__logreg").split()
    assert [d.rsplit("/", 1)[1] for d in named] == ["c__logreg", "a__logreg"]
    submission = value("BLEND_SUBMISSION", data_dir=data_dir, runs="a__logreg", clip="0.01")
    assert submission.endswith(config.blend_run_name(["a__logreg"]) + "__clip0.01.csv")


def test_valid_clips_and_defaults_pass():
    for clip in ("auto", "0.005", "1e-4", "0.49"):
        assert not plan.as_make(plan.Variables(clip=clip)).startswith("PLAN_ERROR")


def test_folds_are_checked_against_the_smaller_class_of_the_data(tmp_path):
    train = tmp_path / "comp" / "train"
    train.mkdir(parents=True)
    for i in range(3):
        (train / f"cat.{i}.jpg").write_bytes(b"")
    for i in range(5):
        (train / f"dog.{i}.jpg").write_bytes(b"")
    (train / "notes.txt").write_bytes(b"")
    data_dir = str(tmp_path / "comp")
    assert not plan.as_make(plan.Variables(data_dir=data_dir, folds="3")).startswith("PLAN_ERR")
    text = plan.as_make(plan.Variables(data_dir=data_dir, folds="4"))
    assert "FOLDS=4 is more than the 3 images of the smaller class" in text
    assert "(cats 3, dogs 5)" in text and "2 <= FOLDS <= 3" in text


def test_the_default_blend_leaves_out_random_weights_runs(models_of_a_fresh_dataset):
    data_dir, models = models_of_a_fresh_dataset
    names = ("a__logreg", "a__logreg__random__folds2", "lite0__finetune1__augflip__random")
    for name in names:
        (models / name).mkdir(parents=True)
        (models / name / "metrics.json").write_text("{}")
    dirs = value("BLEND_RUN_DIRS", data_dir=data_dir).split()
    assert [d.rsplit("/", 1)[1] for d in dirs] == ["a__logreg"]
    assert value("BLEND_LEFT_OUT", data_dir=data_dir).split() == sorted(names[1:])
    named = value("BLEND_RUN_DIRS", data_dir=data_dir, runs=" ".join(names[:2])).split()
    assert [d.rsplit("/", 1)[1] for d in named] == list(names[:2])  # named: taken
    assert value("BLEND_LEFT_OUT", data_dir=data_dir, runs=" ".join(names[:2])) == ""
