"""store's partial names and path-based atomic saves."""

from __future__ import annotations

from pathlib import Path

import pytest

from dogscats import store


@pytest.mark.parametrize(
    "name, partial",
    [
        ("train.npy", "train.partial.npy"),
        ("w_notop.weights.h5", "w_notop.partial.weights.h5"),
        ("model.keras", "model.partial.keras"),
        ("features.h5", "features.h5.partial"),
        ("metrics.json", "metrics.json.partial"),
        (".npy", ".npy.partial"),
    ],
)
def test_partial_names_keep_the_suffix_writers_insist_on(name, partial):
    assert store.partial_path(Path("d") / name) == Path("d") / partial


def test_atomic_save_renames_a_complete_file_into_place(tmp_path):
    target = tmp_path / "sub" / "w.weights.h5"
    seen = []

    def save(partial: Path) -> None:
        seen.append(partial)
        partial.write_bytes(b"new")

    assert store.atomic_save(target, save) == target
    assert seen == [tmp_path / "sub" / "w.partial.weights.h5"]
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path):
    target = tmp_path / "w.weights.h5"
    target.write_bytes(b"old")

    def fail(partial: Path) -> None:
        partial.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.atomic_save(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
