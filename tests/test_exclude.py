"""EXCLUDE lists: the format, the rows they drop, the ids they refuse, what a run records."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, separable, write_features

from dogscats import exclude, train

IDS = np.array(["cat.0", "cat.1", "cat.2", "dog.0", "dog.1", "dog.2"])


def test_a_list_is_file_names_with_comments_and_blank_lines(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("# header\n\ncat.1.jpg  # looks like a dog\ndog.2.jpg\ncat.1.jpg\n")
    assert exclude.read_list(path) == ["cat.1.jpg", "dog.2.jpg"]
    assert exclude.excluded_rows(IDS, path).tolist() == [False, True, False, False, False, True]
    again = exclude.write_list(tmp_path / "again.txt", ["cat.1.jpg"], header="from a gallery")
    assert again.read_text() == "# from a gallery\ncat.1.jpg\n"


def test_malformed_names_are_refused_absent_ones_skipped_in_one_line(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("cat.1.jpg\ncat.4688.jpg\ncat1.jpg\nkitten.png\n")
    message = (
        f"EXCLUDE={path} holds 2 line(s) that are not train file names (cat.N.jpg / "
        "dog.N.jpg): cat1.jpg, kitten.png. Fix or remove those lines."
    )
    with pytest.raises(ValueError) as error:
        exclude.excluded_rows(IDS, path)
    assert str(error.value) == message
    path.write_text("cat.1.jpg\ncat.4688.jpg\ndog.12376.jpg\n")
    log = []
    assert exclude.excluded_rows(IDS, path, log.append).tolist() == [0, 1, 0, 0, 0, 0]
    assert log == [
        f"EXCLUDE={path}: skipped 2 of its 3 names, not train images of this data set (not in "
        "DATA_DIR/train, or left out by preprocessing): cat.4688.jpg, dog.12376.jpg"
    ]
    with pytest.raises(FileNotFoundError, match="no such file"):
        exclude.read_list(tmp_path / "absent.txt")


def test_the_shipped_list_works_on_a_subset_of_the_competition(tmp_path):
    """A 10,000-image split holds some of the shipped names: those are left out, the others
    counted and skipped in one line."""
    listed = exclude.read_list(REPO / "lists" / "mislabelled-train.txt")
    ids = np.array([f"{animal}.{n}" for animal in ("cat", "dog") for n in range(5000)])
    log = []
    mask = exclude.excluded_rows(ids, REPO / "lists" / "mislabelled-train.txt", log.append)
    inside = [name for name in listed if name.removesuffix(".jpg") in set(ids)]
    assert 0 < len(inside) < len(listed)
    assert sorted(ids[mask] + ".jpg") == sorted(inside)
    (line,) = log
    assert f"skipped {len(listed) - len(inside)} of its 50 names" in line and len(line) < 300


def test_the_shipped_list_parses_to_fifty_distinct_train_names():
    names = exclude.read_list(REPO / "lists" / "mislabelled-train.txt")
    assert len(names) == 50 and all(n.split(".")[0] in ("cat", "dog") for n in names)
    assert {"cat.4688.jpg", "dog.1773.jpg", "dog.12376.jpg"} <= set(names)


def test_train_with_exclude_records_the_list_and_keeps_every_row(tmp_path):
    X, y = separable(n=60, dim=6)
    ids = [f"{'dog' if v else 'cat'}.{i}" for i, v in enumerate(y)]
    path = tmp_path / "f.h5"
    write_features(path, ids, y, X, ["1", "2"], X[:2])
    listed = tmp_path / "list.txt"
    listed.write_text(
        f"# two of these, one of the full set\n{ids[4]}.jpg\n{ids[7]}.jpg\ndog.9999.jpg\n"
    )
    log = []
    out = train.train([path], tmp_path / "run", n_folds=3, exclude=listed, log=log.append)
    assert f"EXCLUDE={listed}: 2 train images left out of every fit" in log
    assert any(line.startswith(f"EXCLUDE={listed}: skipped 1 of its 3 names") for line in log)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["excluded"] == [ids[4], ids[7]]
    assert metrics["settings"]["exclude"]["count"] == 3
    assert len(pd.read_csv(out / "oof.csv")) == 60  # still predicted out of fold
    log.clear()
    listed.write_text(f"{ids[4]}.jpg\n")  # another list: another digest, the run is redone
    train.train([path], out, n_folds=3, exclude=listed, log=log.append)
    assert log[0].startswith(f"{out} is out of date (settings changed: exclude)")
