"""Every derived path and name has one owner: config.py."""

from __future__ import annotations

from dogscats import config


def test_feature_paths_are_kept_apart_per_dataset_and_settings(tmp_path):
    a = config.feature_path(tmp_path / "one" / "data", "resnet50")
    b = config.feature_path(tmp_path / "two" / "data", "resnet50")
    assert a.parent != b.parent and a.name == b.name == "resnet50.h5"
    assert a.parent.parent == config.FEATURES_DIR
    random_flip = config.feature_path(tmp_path, "resnet50", weights="random", tta="flip")
    assert random_flip.name == "resnet50.random.flip.h5"


def test_a_flip_file_serves_a_plain_request(tmp_path):
    data_dir = tmp_path / "data"
    plain = config.feature_path(data_dir, "resnet50")
    flip = config.feature_path(data_dir, "resnet50", tta="flip")
    assert plain != flip
    flip.parent.mkdir(parents=True)
    flip.touch()
    try:
        assert config.feature_path(data_dir, "resnet50") == flip
    finally:
        flip.unlink()
        flip.parent.rmdir()


def test_run_names_carry_every_setting_off_its_default(tmp_path):
    assert config.head_run_name(["a", "b"], "logreg") == "a+b__logreg"
    assert (
        config.head_run_name(["a"], "keras", weights="random", precision="bfloat16", tta="flip")
        == "a__keras__random__bf16__flip"
    )
    assert config.head_run_name(["a"], "logreg", folds=10, seed=1) == "a__logreg__folds10__seed1"
    listed = tmp_path / "x" / "b.txt"
    listed.parent.mkdir()
    listed.write_text("cat.1.jpg\n")
    named = config.head_run_name(["a"], "logreg", tta="flip", normalise="ssr_l2", exclude=listed)
    digest = config.file_digest(listed)[:8]
    assert named == f"a__logreg__flip__ssr_l2__excl-b-{digest}"
    name = config.finetune_run_name(
        "lite0", 1, "flip", {"learning_rate": "1e-4", "epochs": "3"}, tta="flip"
    )
    assert name == "lite0__finetune1__augflip__ep3__lr1e-4__flip"


def test_submission_names_a_fixed_clip(tmp_path):
    assert config.submission_path(tmp_path, "run").name == "run.csv"
    assert config.submission_path(tmp_path, "run", "0.005").name == "run__clip0.005.csv"


def test_method_versions_are_whole_numbers():
    for stage in ("train", "finetune"):
        assert config.method_version(stage) >= 1


def test_run_submissions_finds_the_auto_and_fixed_clip_files(tmp_path, monkeypatch):
    data = tmp_path / "comp"
    folder = config.submissions_dir(data, tmp_path)
    monkeypatch.setattr(config, "submissions_dir", lambda data_dir: folder)
    folder.mkdir(parents=True)
    for name in ("r__logreg.csv", "r__logreg__clip0.005.csv", "r__logreg__flip.csv"):
        (folder / name).write_text("id,label\n")
    found = config.run_submissions(data, "r__logreg")
    assert found == {
        "auto": folder / "r__logreg.csv",
        "0.005": folder / "r__logreg__clip0.005.csv",
    }
    assert (
        config.feature_backbone("x/efficientnet_lite0.random.bf16.flip.h5") == "efficientnet_lite0"
    )
    assert config.most_wrong_path(config.report_path(data)).name == "most_wrong.txt"
