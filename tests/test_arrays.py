"""Images to uint8 arrays on disk: alignment, bad files, atomic resumable runs."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from dogscats.arrays import BadInputError, load_split, preprocess, read_manifest, workers
from dogscats.arrays.decode import load_image

SHARED = Path(__file__).resolve().parents[2] / "shared"
EDGE_CASES = SHARED / "data" / "edge-cases"
SIZE = 16
FINAL_FILES = {
    "train.npy",
    "test.npy",
    "train_index.csv",
    "test_index.csv",
    "report.csv",
    "manifest.json",
    "train_digests.npy",
    "test_digests.npy",
}


def write_image(path: Path, seed: int, h: int = 20, w: int = 28) -> None:
    """A distinct noisy JPEG per seed, so a row pairs with exactly one file."""
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def make_dataset(root: Path, n_train: int = 5, n_test: int = 4) -> Path:
    """Kaggle layout: n_train cats and n_train dogs, test ids 1..n_test; sizes vary."""
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    for i in range(n_train):
        write_image(root / "train" / f"cat.{i}.jpg", seed=i, h=20 + i)
        write_image(root / "train" / f"dog.{i}.jpg", seed=100 + i, w=28 + i)
    for i in range(1, n_test + 1):
        write_image(root / "test" / f"{i}.jpg", seed=1000 + i)
    return root


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def assert_rows_match_files(out: Path, data_dir: Path, split: str) -> pd.DataFrame:
    images, index = load_split(out, split)
    assert images.dtype == np.uint8 and images.shape == (len(index), SIZE, SIZE, 3)
    assert not images.flags.writeable
    for row, name in enumerate(index["file"]):
        np.testing.assert_array_equal(images[row], load_image(data_dir / split / name, SIZE))
    return index


def names_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "comp")


def test_preprocess_writes_aligned_arrays(dataset, tmp_path):
    before = snapshot(dataset)
    out = tmp_path / "arrays"
    manifest = preprocess(dataset, SIZE, out_dir=out, workers=2, progress=False)
    stamps = {"train_done.json", "test_done.json", "train.state.npz", "test.state.npz"}
    assert names_in(out) == FINAL_FILES | stamps
    assert manifest["counts"] == {"train": 10, "test": 4} and manifest["size"] == SIZE
    assert read_manifest(out) == manifest and len(manifest["fingerprint"]) == 40
    train = assert_rows_match_files(out, dataset, "train")
    assert train["id"].tolist()[:2] == ["cat.0", "cat.1"] and train["label"].sum() == 5
    test = assert_rows_match_files(out, dataset, "test")
    assert test["id"].tolist() == [1, 2, 3, 4] and (test["label"] == -1).all()
    assert pd.read_csv(out / "report.csv").empty
    assert snapshot(dataset) == before  # DATA_DIR is never written to


def test_bad_train_files_are_left_out_and_reported(dataset, tmp_path):
    train = dataset / "train"
    whole = (train / "cat.1.jpg").read_bytes()
    (train / "cat.1.jpg").write_bytes(whole[: len(whole) // 2])
    (train / "dog.3.jpg").write_bytes(b"")
    (train / "kitten.jpg").write_bytes(whole)
    out = tmp_path / "arrays"
    manifest = preprocess(dataset, SIZE, out_dir=out, workers=2, progress=False)
    report = pd.read_csv(out / "report.csv")
    assert report.columns.tolist() == ["file", "split", "reason"]
    reasons = dict(zip(report["file"], report["reason"], strict=True))
    assert set(reasons) == {"cat.1.jpg", "dog.3.jpg", "kitten.jpg"}
    assert "truncated" in reasons["cat.1.jpg"] and "empty" in reasons["dog.3.jpg"]
    assert "does not match" in reasons["kitten.jpg"] and set(report["split"]) == {"train"}
    assert manifest["counts"]["train"] == 8 and manifest["reported"] == 3
    index = assert_rows_match_files(out, dataset, "train")  # compacted rows stay aligned
    assert "cat.1" not in set(index["id"]) and "dog.3" not in set(index["id"])
    assert not [name for name in names_in(out) if "partial" in name or "compact" in name]


def test_each_row_goes_out_with_one_pwrite_at_its_offset(dataset, tmp_path, monkeypatch):
    (dataset / "train" / "cat.2.jpg").write_bytes(b"")
    row_bytes = SIZE * SIZE * 3
    writes = []

    def counting_pwrite(fd, data, offset):
        writes.append((len(data), offset))
        return os.pwrite(fd, data, offset)

    monkeypatch.setattr(workers, "_pwrite_all", counting_pwrite)
    out = tmp_path / "arrays"
    preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    header = np.load(out / "test.npy", mmap_mode="r").offset  # header length, the same in both
    rows = [*range(4), *(row for row in range(10) if row != 2)]  # test; train without cat.2
    assert writes == [(row_bytes, header + row * row_bytes) for row in rows]
    index = assert_rows_match_files(out, dataset, "train")
    assert "cat.2" not in set(index["id"])


def test_bad_test_file_stops_the_run_naming_each(dataset, tmp_path):
    (dataset / "test" / "2.jpg").write_bytes(b"not a jpeg")
    (dataset / "test" / "4.jpg").write_bytes(b"")
    out = tmp_path / "arrays"
    with pytest.raises(BadInputError) as info:
        preprocess(dataset, SIZE, out_dir=out, workers=2, progress=False)
    assert "2.jpg" in str(info.value) and "4.jpg" in str(info.value)
    assert "\n" not in str(info.value) and str(out / "report.csv") in str(info.value)
    assert not names_in(out) & (FINAL_FILES - {"report.csv"})  # the report names them all
    report = pd.read_csv(out / "report.csv")
    assert report["file"].tolist() == ["2.jpg", "4.jpg"] and set(report["split"]) == {"test"}
    with pytest.raises(FileNotFoundError, match="make preprocess"):
        load_split(out, "test")


class Interrupt:
    """load_image that raises KeyboardInterrupt on call number `at` (counting all calls)."""

    def __init__(self, at: int | None):
        self.at, self.calls = at, []

    def __call__(self, path, size, out=None, **options):
        self.calls.append(Path(path))
        if len(self.calls) == self.at:
            raise KeyboardInterrupt
        return load_image(path, size, out, **options)


def test_resume_after_interruption_redoes_only_missing_rows(dataset, tmp_path, monkeypatch):
    out = tmp_path / "arrays"
    monkeypatch.setattr(workers, "ROWS_PER_TASK", 3)
    # test (4 rows) runs first and finishes; train is cut on its 8th file, after 2 tasks.
    monkeypatch.setattr(workers, "load_image", Interrupt(at=4 + 8))
    with pytest.raises(KeyboardInterrupt):
        preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    assert {"train.partial.npy", "train.partial.state.npz", "test.npy"} <= names_in(out)
    assert "train.npy" not in names_in(out) and "manifest.json" not in names_in(out)

    resumed = Interrupt(at=None)
    monkeypatch.setattr(workers, "load_image", resumed)
    manifest = preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    assert [p.parent.name for p in resumed.calls] == ["train"] * 4  # 10 - 2 tasks of 3
    assert manifest["counts"] == {"train": 10, "test": 4}
    assert_rows_match_files(out, dataset, "train")
    assert not [name for name in names_in(out) if "partial" in name or name.endswith(".tmp")]


def test_worker_failure_leaves_no_final_files_and_rerun_completes(dataset, tmp_path, monkeypatch):
    def fail_on_dog_2(path, size, out=None, **options):  # fork-started workers inherit this
        if Path(path).name == "dog.2.jpg":
            raise RuntimeError("simulated worker crash")
        return load_image(path, size, out, **options)

    out = tmp_path / "arrays"
    monkeypatch.setattr(workers, "ROWS_PER_TASK", 2)
    monkeypatch.setattr(workers, "load_image", fail_on_dog_2)
    with pytest.raises(RuntimeError, match="simulated"):
        preprocess(dataset, SIZE, out_dir=out, workers=2, progress=False)
    assert not names_in(out) & (FINAL_FILES - {"test.npy", "test_index.csv", "test_digests.npy"})
    monkeypatch.setattr(workers, "load_image", load_image)
    preprocess(dataset, SIZE, out_dir=out, workers=2, progress=False)
    assert_rows_match_files(out, dataset, "train")


def test_up_to_date_rerun_is_a_no_op_until_a_source_changes(dataset, tmp_path, monkeypatch):
    out = tmp_path / "arrays"
    first = preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    counter = Interrupt(at=None)
    monkeypatch.setattr(workers, "load_image", counter)
    assert preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False) == first
    assert counter.calls == []

    write_image(dataset / "test" / "3.jpg", seed=77)  # a changed test file
    second = preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    assert [p.name for p in counter.calls] == ["3.jpg"]  # only its row; train was kept
    assert second["fingerprint"] != first["fingerprint"]
    assert_rows_match_files(out, dataset, "test")


def test_an_image_replaced_in_place_redoes_its_row_and_equals_a_fresh_run(
    dataset, tmp_path, monkeypatch
):
    """Same name, same size, other pixels: the stamps (size, mtime_ns) see it, and the arrays
    after the redo are byte-identical to those of a run from scratch."""
    out = tmp_path / "arrays"
    preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    target = dataset / "train" / "dog.1.jpg"
    before = target.stat()
    write_image(target, seed=99)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 1))  # as an editor might
    counter = Interrupt(at=None)
    monkeypatch.setattr(workers, "load_image", counter)
    preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    assert [p.name for p in counter.calls] == ["dog.1.jpg"]
    fresh = tmp_path / "fresh"
    preprocess(dataset, SIZE, out_dir=fresh, workers=1, progress=False)
    for split in ("train", "test"):
        assert (out / f"{split}.npy").read_bytes() == (fresh / f"{split}.npy").read_bytes()
    assert read_manifest(out)["fingerprint"] == read_manifest(fresh)["fingerprint"]
    assert_rows_match_files(out, dataset, "test")


def test_workers_keep_decoder_warnings_off_stderr(dataset, tmp_path, capfd):
    path = dataset / "train" / "cat.0.jpg"
    data = bytearray(path.read_bytes())
    scan = data.rfind(b"\xff\xda")
    data[scan + 100 : scan + 103] = b"\xff\xd0\x12"  # corrupt scan data, still complete
    path.write_bytes(bytes(data))
    preprocess(dataset, SIZE, out_dir=tmp_path / "arrays", workers=2, progress=False)
    assert "Corrupt JPEG" not in capfd.readouterr().err


def test_read_manifest_missing_names_file_and_command(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(info.value)
    assert "make preprocess" in str(info.value)


def test_edge_cases_mixed_into_train(tmp_path):
    if not EDGE_CASES.is_dir():
        pytest.skip(f"{EDGE_CASES} is absent: this test needs ../shared beside the checkout")
    verdicts = {}
    for line in (EDGE_CASES / "README.txt").read_text().splitlines():
        name, _, rest = line.partition(": ")
        if rest.startswith(("ok", "bad")):
            verdicts[name] = rest.split(":")[0]
    data_dir = make_dataset(tmp_path / "comp", n_train=2, n_test=2)
    renamed = {}  # Kaggle name in train/ -> edge-case file
    for number, name in enumerate(sorted(verdicts), start=50):
        kaggle_name = f"{'cat' if number % 2 else 'dog'}.{number}.jpg"
        os.symlink(EDGE_CASES / name, data_dir / "train" / kaggle_name)
        renamed[kaggle_name] = name
    shutil.copy(EDGE_CASES / "tiny.jpg", data_dir / "train" / "tiny.jpg")  # not a Kaggle name

    out = tmp_path / "arrays"
    manifest = preprocess(data_dir, SIZE, out_dir=out, workers=2, progress=False)
    index = assert_rows_match_files(out, data_dir, "train")
    loaded = {renamed[f] for f in index["file"] if f in renamed}
    assert loaded == {name for name, verdict in verdicts.items() if verdict == "ok"}
    report = pd.read_csv(out / "report.csv")
    reported = {renamed.get(f, f) for f in report["file"]}
    assert reported == {name for name, v in verdicts.items() if v == "bad"} | {"tiny.jpg"}
    assert manifest["counts"]["train"] == 4 + len(loaded)


def test_array_blocks_are_reserved_before_decoding(dataset, tmp_path, monkeypatch):
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("this platform has no posix_fallocate; arrays are filled sparse")
    reserved = []
    real = os.posix_fallocate

    def spy(fd, offset, length):
        reserved.append((os.fstat(fd).st_size, offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", spy)
    out = tmp_path / "arrays"
    preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    sizes = sorted(os.path.getsize(out / f"{split}.npy") for split in ("test", "train"))
    assert sorted(total for total, _, _ in reserved) == sizes  # both arrays, whole files
    assert all(offset == 0 and length == total for total, offset, length in reserved)


def test_full_disk_fails_before_decoding_naming_the_array(dataset, tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    counter = Interrupt(at=None)
    monkeypatch.setattr(workers, "load_image", counter)
    out = tmp_path / "arrays"
    with pytest.raises(OSError, match="no room for .* GB of image arrays") as info:
        preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    assert info.value.errno == errno.ENOSPC and "test.partial.npy" in str(info.value)
    assert counter.calls == []  # nothing decoded in vain


# ---------------------------------------------------------------------------------------------
# Damaged caches (issue 12): named, set aside, rebuilt; never a traceback from numpy or json


def test_a_truncated_array_is_named_set_aside_and_rebuilt(dataset, tmp_path):
    out = tmp_path / "arrays"
    preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    whole = (out / "train.npy").read_bytes()
    with open(out / "train.npy", "r+b") as handle:
        handle.truncate(len(whole) - 100)
    with pytest.raises(ValueError, match=r"train.npy is damaged: unreadable .* run make"):
        load_split(out, "train")
    assert not (out / "manifest.json").exists()  # make now sees the arrays as missing
    preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    assert (out / "train.npy").read_bytes() == whole


def test_preprocess_redoes_a_split_cut_behind_its_manifest(dataset, tmp_path, monkeypatch):
    out = tmp_path / "arrays"
    preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    whole = (out / "test.npy").read_bytes()
    with open(out / "test.npy", "r+b") as handle:
        handle.truncate(len(whole) // 2)
    counter = Interrupt(at=None)
    monkeypatch.setattr(workers, "load_image", counter)
    preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    assert {p.parent.name for p in counter.calls} == {"test"}
    assert (out / "test.npy").read_bytes() == whole


def test_a_cut_manifest_is_named_set_aside_and_rebuilt(dataset, tmp_path):
    out = tmp_path / "arrays"
    first = preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"manifest.json is damaged .* run make"):
        load_split(out, "train")
    assert (out / "manifest.json.damaged").exists() and not (out / "manifest.json").exists()
    assert preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False) == first
    # Dated as the unchanged arrays, so that make leaves the feature files made since alone.
    made = FINAL_FILES - {"report.csv", "manifest.json", "train_digests.npy", "test_digests.npy"}
    arrays_made = max((out / name).stat().st_mtime_ns for name in made)
    assert (out / "manifest.json").stat().st_mtime_ns == arrays_made


# ---------------------------------------------------------------------------------------------
# Dead ends (issue 23): a run goes on with a report, or stops with one line


def test_hidden_files_in_test_and_train_are_ignored(dataset, tmp_path):
    for split in ("train", "test"):
        (dataset / split / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (dataset / split / "._1.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    manifest = preprocess(dataset, SIZE, out_dir=tmp_path / "arrays", workers=1, progress=False)
    assert manifest["counts"] == {"train": 10, "test": 4} and manifest["reported"] == 0
    assert pd.read_csv(tmp_path / "arrays" / "report.csv").empty


def test_a_dangling_symlink_in_train_is_reported_and_left_out(dataset, tmp_path, capsys):
    from dogscats import plan

    (dataset / "train" / "cat.9.jpg").symlink_to(tmp_path / "gone.jpg")
    stamp = tmp_path / "sources.json"
    assert plan.refresh_sources_stamp(dataset, stamp)  # make's scan of the sources copes too
    out = tmp_path / "arrays"
    manifest = preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    report = pd.read_csv(out / "report.csv")
    assert report.values.tolist() == [
        [
            "cat.9.jpg",
            "train",
            f"dangling symlink: its target {tmp_path / 'gone.jpg'} does not exist",
        ]
    ]
    assert manifest["counts"]["train"] == 10 and manifest["reported"] == 1
    assert f"Left out 1 train file(s), listed in {out / 'report.csv'}: cat.9.jpg" in (
        capsys.readouterr().out
    )
    assert_rows_match_files(out, dataset, "train")


def test_a_dangling_symlink_in_test_stops_the_run_in_one_line(dataset, tmp_path):
    (dataset / "test" / "9.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(BadInputError) as error:
        preprocess(dataset, SIZE, out_dir=tmp_path / "arrays", workers=1, progress=False)
    message = str(error.value)
    assert "\n" not in message and "9.jpg (dangling symlink: its target" in message
    assert message.startswith("1 test file(s) in ") and not (tmp_path / "arrays").exists()


def test_thousands_of_misnamed_train_files_make_one_short_line(dataset, tmp_path, capsys):
    for i in range(3000):
        (dataset / "train" / f"img_{i:04d}.jpeg").write_bytes(b"")
    out = tmp_path / "arrays"
    manifest = preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    assert manifest["reported"] == 3000 and len(pd.read_csv(out / "report.csv")) == 3000
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "Left out" in line]
    assert line == (
        f"Left out 3,000 train file(s), listed in {out / 'report.csv'}: img_0000.jpeg, "
        "img_0001.jpeg, img_0002.jpeg, img_0003.jpeg, img_0004.jpeg and 2,995 more"
    )


def test_tiny_train_images_are_left_out_and_tiny_test_images_kept_with_a_word(
    dataset, tmp_path, capsys, monkeypatch
):
    """Under 16 px a side: a train image is left out (report.csv says why), a test image is
    decoded and kept (every test id needs a prediction), and report.csv notes it. A run
    stopped in the test split, after that image, keeps the note on resume."""
    write_image(dataset / "train" / "cat.7.jpg", seed=7, h=1, w=1)
    write_image(dataset / "train" / "dog.7.jpg", seed=8, h=15, w=40)
    write_image(dataset / "train" / "dog.8.jpg", seed=9, h=16, w=16)  # the smallest kept
    write_image(dataset / "test" / "2.jpg", seed=10, h=1, w=1)
    out = tmp_path / "arrays"
    monkeypatch.setattr(workers, "ROWS_PER_TASK", 1)
    # Calls: 1.jpg, 2.jpg twice (tiny: decoded again without the limit), 3.jpg, then 4.jpg.
    monkeypatch.setattr(workers, "load_image", Interrupt(at=5))
    with pytest.raises(KeyboardInterrupt):
        preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    assert np.load(out / "test.partial.state.npz")["notes"].tolist() != []
    monkeypatch.setattr(workers, "load_image", load_image)
    manifest = preprocess(dataset, SIZE, out_dir=out, workers=1, progress=False)
    assert manifest["counts"] == {"train": 11, "test": 4} and manifest["reported"] == 3
    report = pd.read_csv(out / "report.csv")
    assert report.values.tolist() == [
        ["cat.7.jpg", "train", "tiny image (1x1, under 16 px a side)"],
        ["dog.7.jpg", "train", "tiny image (40x15, under 16 px a side)"],
        ["2.jpg", "test", "tiny image (1x1, under 16 px a side): " + workers.KEPT_TINY],
    ]
    index = assert_rows_match_files(out, dataset, "train")
    assert {"cat.7", "dog.7"}.isdisjoint(index["id"]) and "dog.8" in set(index["id"])
    test = assert_rows_match_files(out, dataset, "test")
    assert 2 in set(test["id"])  # predicted like any other test image
    printed = capsys.readouterr().out
    assert "Left out 2 train file(s)" in printed
    assert (
        f"Kept 1 tiny test image(s) (under 16 px a side), predicted from their upscaled "
        f"pixels, listed in {out / 'report.csv'}: 2.jpg" in printed
    )
