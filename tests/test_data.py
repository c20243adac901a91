"""The raw competition folders: Kaggle name parsing, getting the data."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from dogscats import data
from dogscats.data import (
    TRAIN_NAME_REASON,
    BadInputError,
    DataMissingError,
    ensure_data,
    scan_split,
)

# --- scanning ---------------------------------------------------------------------------------


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")


def test_scan_train_parses_labels_and_rejects_odd_names(tmp_path):
    odd = ["Cat.3.jpg", "cat.jpg", "dog.5.jpeg", "notes.txt", "cat.4.jpg.bak", "bird.1.jpg"]
    touch(tmp_path / "train", "dog.1.jpg", "cat.10.jpg", "cat.2.jpg", *odd)
    frame, rejects = scan_split(tmp_path, "train")
    assert frame["id"].tolist() == ["cat.2", "cat.10", "dog.1"]  # numeric, cats first
    assert frame["label"].tolist() == [0, 0, 1]
    assert frame["file"].tolist() == ["cat.2.jpg", "cat.10.jpg", "dog.1.jpg"]
    assert sorted(rejects) == sorted((name, TRAIN_NAME_REASON) for name in odd)


def test_scan_test_sorts_ids_numerically(tmp_path):
    touch(tmp_path / "test", "10.jpg", "2.jpg", "1.jpg")
    frame, rejects = scan_split(tmp_path, "test")
    assert frame["id"].tolist() == [1, 2, 10]
    assert frame["label"].tolist() == [-1, -1, -1]
    assert rejects == []


def test_scan_test_odd_name_is_an_error(tmp_path):
    touch(tmp_path / "test", "1.jpg", "cat.2.jpg", "3.png")
    with pytest.raises(BadInputError, match="cat.2.jpg") as info:
        scan_split(tmp_path, "test")
    assert "3.png" in str(info.value)


def test_scan_missing_split_names_the_folder(tmp_path):
    with pytest.raises(DataMissingError, match="train"):
        scan_split(tmp_path, "train")


# --- ensure_data ------------------------------------------------------------------------------


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return path


def competition_zip(folder: Path) -> Path:
    """The Kaggle download: an outer zip of train.zip, test.zip and sample_submission.csv."""
    train_files = {"train/cat.0.jpg": b"c", "train/dog.0.jpg": b"d"}
    train = make_zip(folder / "inner-train.zip", train_files)
    test = make_zip(folder / "inner-test.zip", {"test/1.jpg": b"t"})
    outer = make_zip(
        folder / data.OUTER_ZIP,
        {
            "train.zip": train.read_bytes(),
            "test.zip": test.read_bytes(),
            "sample_submission.csv": b"id,label\n1,0.5\n",
        },
    )
    train.unlink()
    test.unlink()
    return outer


def test_ensure_data_present_is_a_no_op(tmp_path):
    touch(tmp_path / "train", "cat.0.jpg")
    touch(tmp_path / "test", "1.jpg")
    assert ensure_data(tmp_path) == tmp_path.resolve()


@pytest.mark.parametrize("split", ["train", "test"])
def test_data_dir_set_to_a_split_folder_names_its_parent(tmp_path, split):
    touch(tmp_path / "train", "cat.0.jpg")
    touch(tmp_path / "test", "1.jpg")
    with pytest.raises(DataMissingError) as info:
        ensure_data(tmp_path / split)
    root = tmp_path.resolve()
    assert str(info.value) == (
        f"DATA_DIR={root / split} is the competition's {split}/ folder: give the folder that "
        f"holds train/ and test/, DATA_DIR={root}"
    )


def test_ensure_data_extracts_competition_zip(tmp_path):
    competition_zip(tmp_path)
    ensure_data(tmp_path)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["cat.0.jpg", "dog.0.jpg"]
    assert [p.name for p in (tmp_path / "test").iterdir()] == ["1.jpg"]
    assert (tmp_path / "sample_submission.csv").is_file()
    assert not list(tmp_path.glob(".extract-*"))  # scratch folder cleaned up


def test_ensure_data_without_anything_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(DataMissingError) as info:
        ensure_data(tmp_path / "data")
    message = str(info.value)
    root = str((tmp_path / "data").resolve())
    for needle in (f"{root}/train/", f"{root}/test/", "sample_submission.csv", data.OUTER_ZIP):
        assert needle in message
    assert "kaggle.json" in message and "KAGGLE_USERNAME" in message and "rules" in message


def test_ensure_data_downloads_with_kaggle_cli(tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/kaggle")
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        competition_zip(Path(command[command.index("-p") + 1]))
        return data.subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    ensure_data(tmp_path)
    assert calls[0][1:5] == ["competitions", "download", "-c", data.COMPETITION]
    assert (tmp_path / "train" / "cat.0.jpg").is_file()


def test_ensure_data_reports_kaggle_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/kaggle")
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    monkeypatch.setattr(
        data.subprocess,
        "run",
        lambda command, **kw: data.subprocess.CompletedProcess(command, 1, "", "403 Forbidden"),
    )
    with pytest.raises(DataMissingError, match="403 Forbidden"):
        ensure_data(tmp_path)


@pytest.mark.parametrize("how", ["chmod", "os.access"])
def test_a_read_only_data_dir_with_zips_says_what_to_do(tmp_path, monkeypatch, how):
    """chmod is the real damage; as root (who may write anyway) the same answer is checked
    through os.access."""
    competition_zip(tmp_path)
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders; the os.access case covers it")
        tmp_path.chmod(0o555)
    else:
        monkeypatch.setattr(data.os, "access", lambda path, mode: False)
    try:
        with pytest.raises(DataMissingError, match="is read-only, so `make data` cannot unzip"):
            ensure_data(tmp_path)
    finally:
        tmp_path.chmod(0o755)
    assert not (tmp_path / "train").exists() and not list(tmp_path.glob(".extract-*"))


# --- dead ends named as such (issue 23) ---------------------------------------------------------


def test_hidden_files_are_skipped_in_both_splits(tmp_path):
    touch(tmp_path / "train", "cat.1.jpg", "dog.1.jpg", ".DS_Store", "._cat.1.jpg")
    touch(tmp_path / "test", "1.jpg", ".DS_Store", "._1.jpg", ".1.jpg.swp")
    frame, rejects = scan_split(tmp_path, "train")
    assert frame["file"].tolist() == ["cat.1.jpg", "dog.1.jpg"] and rejects == []
    assert scan_split(tmp_path, "test")[0]["file"].tolist() == ["1.jpg"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_split_unzipped_one_folder_too_deep_is_named(tmp_path, split):
    name = "cat.1.jpg" if split == "train" else "1.jpg"
    touch(tmp_path / split / split, name)
    with pytest.raises(BadInputError) as error:
        scan_split(tmp_path, split)
    folder = tmp_path / split
    assert str(error.value) == (
        f"{folder} holds no {data.PATTERNS[split]} images, but {folder / split} does: the zip "
        f"was unpacked one folder too deep. Move that folder up: mv {folder} {folder}.outer && "
        f"mv {folder}.outer/{split} {folder} && rmdir {folder}.outer"
    )


def test_a_folder_among_train_images_is_reported_as_a_folder(tmp_path):
    touch(tmp_path / "train", "cat.1.jpg")
    (tmp_path / "train" / "dog.2.jpg").mkdir()
    assert scan_split(tmp_path, "train")[1] == [("dog.2.jpg", data.FOLDER_REASON)]


def test_thousands_of_misnamed_test_files_make_one_short_line(tmp_path):
    touch(tmp_path / "test", "1.jpg", *(f"img_{i:04d}.jpeg" for i in range(3000)))
    with pytest.raises(BadInputError) as error:
        scan_split(tmp_path, "test")
    message = str(error.value)
    assert "\n" not in message and len(message) < 300
    assert message.endswith(
        "img_0000.jpeg, img_0001.jpeg, img_0002.jpeg, img_0003.jpeg, img_0004.jpeg and 2,995 more"
    )
    assert message.startswith("test/ holds 3,000 file(s) not named N.jpg")


@pytest.mark.parametrize("missing", ["test", "train"])
def test_a_missing_split_beside_the_other_is_named(tmp_path, monkeypatch, missing):
    there = "train" if missing == "test" else "test"
    touch(tmp_path / there, "cat.1.jpg" if there == "train" else "1.jpg")
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(DataMissingError) as error:
        ensure_data(tmp_path)
    root = tmp_path.resolve()
    assert str(error.value).startswith(f"{root / missing} is missing ({root / there} is there)")
    assert "\n" not in str(error.value)


def test_a_missing_test_folder_comes_from_test_zip_alone(tmp_path):
    touch(tmp_path / "train", "cat.0.jpg")
    make_zip(tmp_path / "test.zip", {"test/1.jpg": b"t"})
    ensure_data(tmp_path)
    assert [p.name for p in (tmp_path / "test").iterdir()] == ["1.jpg"]
