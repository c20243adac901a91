"""Feature extraction: shapes, provenance, flip TTA, resume after an interruption."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import extract_random, register_tiny_backbone, separable, write_features

from dogscats import arrays, features
from dogscats.backbones import build_backbone, get_backbone
from dogscats.forward import Forward, make_forward

pytestmark = pytest.mark.backend  # make test runs these under JAX too


@pytest.fixture
def arrays_224(kaggle_dataset, tmp_path):
    out = tmp_path / "arrays"
    arrays.preprocess(kaggle_dataset, 224, out_dir=out, workers=1, progress=False)
    return kaggle_dataset, out


def test_features_match_the_model_and_record_their_provenance(arrays_224, tmp_path):
    data_dir, arrays_dir = arrays_224
    path = extract_random(data_dir, arrays_dir, tmp_path / "f.h5", tta="flip")
    images, index = arrays.load_split(arrays_dir, "train")
    train = features.load_features(path, "train")
    assert train["features"].shape == (16, 2048) and train["features"].dtype == np.float32
    assert list(train["ids"]) == index["id"].astype(str).tolist()
    assert list(train["labels"]) == index["label"].tolist()
    attrs = train["attrs"]
    assert attrs["backbone"] == "resnet50" and attrs["input_size"] == 224
    assert attrs["weights"] == "random" and attrs["tta"] == "flip"
    assert attrs["fingerprint"] == arrays.read_manifest(arrays_dir)["fingerprint"]
    assert len(features.load_features(path, "test")["features"]) == 6
    with h5py.File(path) as f:
        assert not np.allclose(f["train/features"][:], f["train/features_flip"][:])


def test_flip_features_are_the_features_of_mirrored_images(arrays_224, tmp_path):
    data_dir, arrays_dir = arrays_224
    spec = get_backbone("resnet50")
    model = build_backbone("resnet50", weights="random")
    forward = make_forward(model, spec, batch_size=2, flip=True)
    images, _ = arrays.load_split(arrays_dir, "train")
    plain, flipped = forward.run(np.asarray(images[:2]))
    x = spec.preprocess_fn()(images[:2].astype("float32"))
    assert np.allclose(plain, model.predict(x, verbose=0), atol=1e-4)
    mirrored = spec.preprocess_fn()(images[:2, :, ::-1].astype("float32"))
    assert np.allclose(flipped, model.predict(mirrored, verbose=0), atol=1e-4)


def test_an_up_to_date_file_is_not_rebuilt(arrays_224, tmp_path, monkeypatch):
    data_dir, arrays_dir = arrays_224
    path = extract_random(data_dir, arrays_dir, tmp_path / "f.h5")
    monkeypatch.setattr(features, "build_model", lambda *a: pytest.fail("rebuilt"))
    assert extract_random(data_dir, arrays_dir, path) == path


def test_an_interrupted_run_leaves_no_file_and_resumes(arrays_224, tmp_path, monkeypatch):
    data_dir, arrays_dir = arrays_224
    out = tmp_path / "f.h5"
    real_call = Forward.__call__
    calls = {"n": 0}

    def failing_call(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_call(self, batch)

    monkeypatch.setattr(Forward, "__call__", failing_call)
    with pytest.raises(KeyboardInterrupt):
        extract_random(data_dir, arrays_dir, out)
    assert not out.exists()
    with h5py.File(out.with_name("f.h5.partial")) as partial:
        # Three batches of 4 ran; the third was still in flight, so two were written.
        assert partial["train"].attrs["rows_done"] == 8
    monkeypatch.setattr(Forward, "__call__", real_call)
    extract_random(data_dir, arrays_dir, out)
    assert out.exists() and not out.with_name("f.h5.partial").exists()
    with h5py.File(out) as f:
        assert np.abs(f["train/features"][:]).sum(axis=1).min() > 0  # every row filled


def test_zeroshot_probability_is_dog_mass_over_dog_and_cat_mass():
    logits = np.full((2, 1000), -50.0)
    logits[0, 200], logits[0, 282] = 2.0, 2.0  # one dog class and one cat class, equal
    logits[1, 160] = 5.0
    p = features.zeroshot_dog_probability(logits)
    assert p[0] == pytest.approx(0.5) and p[1] > 0.99


def test_unknown_tta_is_refused(arrays_224, tmp_path):
    data_dir, arrays_dir = arrays_224
    with pytest.raises(ValueError, match="TTA must be one of none, flip. Received: 'rot'"):
        extract_random(data_dir, arrays_dir, tmp_path / "f.h5", tta="rot")


def test_feature_set_concatenates_and_checks_ids(tmp_path):
    X, y = separable(n=20, dim=4)
    ids = [f"cat.{i}" for i in range(20)]
    a, b, c = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    write_features(a, ids, y, X, ["1", "2"], X[:2])
    write_features(b, ids, y, 2 * X, ["1", "2"], X[:2])
    data = features.load_feature_set([a, b])
    assert data.train.shape == (20, 8) and data.test.shape == (2, 8)
    assert np.array_equal(data.train[:, 4:], 2 * X)
    write_features(c, ids[::-1], y, X, ["1", "2"], X[:2])
    with pytest.raises(features.FeatureMismatchError, match=r"train ids of .*c\.h5 differ"):
        features.load_feature_set([a, c])
    with pytest.raises(features.FeatureMismatchError, match="TTA=flip needs mirrored"):
        features.load_feature_set([a], tta="flip")


# ---------------------------------------------------------------------------------------------
# Complete or absent (issue 12): a full disk, a file that fails its check, a damaged cache


def test_a_full_disk_stops_with_one_line_and_leaves_no_file(arrays_224, tmp_path):
    """RLIMIT_FSIZE makes every write past 60 kB fail as a full disk would (EFBIG instead of
    ENOSPC), inside HDF5. `dogscats.cli features` runs in its own process: HDF5 cannot recover
    from a failed write, and the CLI must end with its one line, status 2, no crash."""
    import resource
    import signal
    import subprocess
    import sys

    from conftest import REPO

    data_dir, arrays_dir = arrays_224
    out = tmp_path / "f.h5"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, don't kill the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, resource.RLIM_INFINITY))

    command = [sys.executable, "-m", "dogscats.cli", "features", "--data-dir", str(data_dir)]
    command += ["--backbone", "resnet50", "--weights", "random", "--batch-size", "4"]
    command += ["--arrays", str(arrays_dir), "--out", str(out)]
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, preexec_fn=limit_file_size
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: writing {out}.partial failed (File too large)")
    assert "the partial file was removed" in last and "needs about 1 MB" in last
    assert "Wrote" not in result.stdout and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("f.h5*"))


def test_no_room_is_refused_before_the_model_is_built(arrays_224, tmp_path, monkeypatch):
    from collections import namedtuple

    data_dir, arrays_dir = arrays_224
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(features.shutil, "disk_usage", lambda _: usage(10**9, 10**9, 1000))
    monkeypatch.setattr(features, "build_model", lambda *a: pytest.fail("built the model"))
    with pytest.raises(OSError, match=r"no room for .*f.h5.partial: the feature file needs about"):
        extract_random(data_dir, arrays_dir, tmp_path / "f.h5")


def test_a_file_that_fails_its_check_never_gets_its_final_name(arrays_224, tmp_path, monkeypatch):
    data_dir, arrays_dir = arrays_224
    out = tmp_path / "f.h5"
    real = features._add_zeroshot

    def spoil(handle, *args):  # as if a row never reached the disk, and another were NaN
        real(handle, *args)
        handle["train/features"][3] = 0
        handle["test/features"][1, 5] = np.nan

    monkeypatch.setattr(features, "_add_zeroshot", spoil)
    with pytest.raises(ValueError, match=r"f.h5.partial: train/features row 3 is all zeros"):
        extract_random(data_dir, arrays_dir, out, backbone=register_tiny_backbone(224))
    assert not out.exists() and not out.with_name("f.h5.partial").exists()


def test_a_truncated_feature_file_is_named_set_aside_and_rebuilt(arrays_224, tmp_path):
    data_dir, arrays_dir = arrays_224
    tiny = register_tiny_backbone(224)
    out = extract_random(data_dir, arrays_dir, tmp_path / "f.h5", backbone=tiny)
    whole = features.load_features(out, "train")["features"]
    with open(out, "r+b") as handle:
        handle.truncate(out.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"f.h5 is damaged: train unreadable .*run make"):
        features.load_features(out, "train")
    assert not out.exists() and out.with_name("f.h5.damaged").exists()
    extract_random(
        data_dir, arrays_dir, out, backbone=tiny
    )  # `make` sees it missing and rebuilds it
    assert np.array_equal(features.load_features(out, "train")["features"], whole)
