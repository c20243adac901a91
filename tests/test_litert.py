"""LiteRT runtime: features within litert.MATCH_TOLERANCE of Keras's, the export cache (reused,
keyed by weights and size, a damaged file set aside and rebuilt), and auto's fallback line."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from conftest import extract_random, register_tiny_backbone

from dogscats import arrays, features, litert
from dogscats.backbones import build_backbone, get_backbone
from dogscats.forward import place

pytest.importorskip("ai_edge_litert")
pytestmark = pytest.mark.skipif(
    __import__("keras").backend.backend() != "tensorflow",
    reason="LiteRT exports go through TensorFlow (KERAS_BACKEND=tensorflow)",
)


@pytest.fixture(autouse=True)
def keras_home(tmp_path, monkeypatch):
    """Exports go to a temporary KERAS_HOME, never the user's cache."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return tmp_path / "keras"


def test_litert_features_equal_keras_features(kaggle_dataset, tmp_path):
    """A registered backbone on a small data set, with TTA=flip: same file layout, the
    runtime recorded, every feature within the tolerance of Keras's."""
    arrays_dir = tmp_path / "arrays"
    arrays.preprocess(kaggle_dataset, 32, out_dir=arrays_dir, workers=1, progress=False)
    name = register_tiny_backbone(32)
    paths = {
        runtime: extract_random(
            kaggle_dataset,
            arrays_dir,
            tmp_path / f"{runtime}.h5",
            name,
            runtime=runtime,
            workers=2,
            tta="flip",
        )
        for runtime in ("keras", "litert")
    }
    for split in ("train", "test"):
        keras_side = features.load_features(paths["keras"], split)
        lite_side = features.load_features(paths["litert"], split)
        for view in ("features", "features_flip"):
            assert lite_side[view].shape == keras_side[view].shape
            assert np.abs(lite_side[view] - keras_side[view]).max() <= 1e-4
            assert np.abs(keras_side[view]).max() > 0.05  # features of a real size
        np.testing.assert_array_equal(lite_side["ids"], keras_side["ids"])
    assert features.load_features(paths["litert"], "train")["attrs"]["runtime"] == "litert"
    assert features.load_features(paths["keras"], "train")["attrs"]["runtime"] == "keras"


def _tiny(size: int = 16, shift: float = 0.0):
    """The tiny backbone (its seeded random weights), its kernel shifted by `shift`."""
    name = register_tiny_backbone(size)
    model = build_backbone(name, weights="random")
    kernel = model.weights[0]
    kernel.assign(kernel.numpy() + shift)
    return model, get_backbone(name)


def test_export_cache_is_reused_and_keyed_by_weights_and_size(keras_home):
    model, spec = _tiny(16)
    lines: list[str] = []
    first = litert.export(model, spec, spec.name, log=lines.append)
    assert first.is_file() and first.parent == keras_home / "litert"
    made = first.stat().st_mtime_ns
    assert litert.export(model, spec, spec.name, log=lines.append) == first
    assert first.stat().st_mtime_ns == made and len(lines) == 1  # reused, not exported again
    other_weights, _ = _tiny(16, shift=0.01)
    assert litert.export(other_weights, spec, spec.name, log=lines.append) != first
    bigger, bigger_spec = _tiny(24)
    assert litert.export(bigger, bigger_spec, bigger_spec.name, log=lines.append) != first
    assert len(list((keras_home / "litert").glob("*.tflite"))) == 3
    assert not list((keras_home / "litert").glob("*partial*"))


def test_damaged_export_is_set_aside_and_rebuilt(keras_home):
    model, spec = _tiny(16)
    path = litert.export(model, spec, spec.name, log=lambda line: None)
    whole = path.read_bytes()
    shifted, _ = _tiny(16, shift=0.05)
    loads_but_differs = litert.export(shifted, spec, spec.name, log=lambda line: None)
    for damage in (whole[:200], loads_but_differs.read_bytes()):  # cut short; another net's
        path.write_bytes(damage)  # behind the tool's back
        lines: list[str] = []
        again = litert.export(model, spec, spec.name, log=lines.append)
        assert again == path and path.with_name(path.name + ".damaged").is_file()
        assert "damaged" in lines[0] and len(lines[0].splitlines()) == 1
    forward = litert.LiteForward(again, spec, 2, flip=True, threads=1)
    batch = litert.check_batch(16)[:2]
    plain, mirrored = forward.run(batch)
    expected = np.asarray(model(spec.preprocess_fn()(batch.astype("float32"))))
    np.testing.assert_allclose(plain, expected, atol=1e-4)
    flipped = np.asarray(model(spec.preprocess_fn()(batch[:, :, ::-1].astype("float32"))))
    np.testing.assert_allclose(mirrored, flipped, atol=1e-4)


def test_auto_falls_back_to_keras_in_one_line_and_litert_refuses(monkeypatch):
    model, spec = _tiny(16)
    where = place("cpu")

    def mismatch(path, network, batch):
        raise litert.RuntimeChoiceError("the LiteRT export differs from Keras by 1.00e-01.")

    monkeypatch.setattr(litert, "_check", mismatch)
    lines: list[str] = []
    forward = litert.forward(model, spec, 2, False, where, "auto", log=lines.append)
    assert forward.runtime == "keras"
    fallback = [line for line in lines if "Running Keras instead" in line]
    assert len(fallback) == 1 and "differs from Keras" in fallback[0]
    assert not list(litert.cache_dir().glob("*.tflite"))  # a refused export is never kept
    with pytest.raises(litert.RuntimeChoiceError, match="differs from Keras"):
        litert.forward(model, spec, 2, False, where, "litert", log=lines.append)
    with pytest.raises(litert.RuntimeChoiceError, match="PRECISION=bfloat16"):
        litert.wanted("litert", where, "bfloat16")
    assert not litert.wanted("auto", where, "bfloat16")
    lite_spec = dataclasses.replace(spec)
    assert litert.forward(model, lite_spec, 2, False, where, "keras").runtime == "keras"


def test_a_recorded_export_is_opened_without_starting_keras(kaggle_dataset, tmp_path, keras_home):
    """The first extraction exports (Keras started) and records the export, with the run's
    other backbone exported ahead; a fresh process then extracts both from the records
    without importing Keras or TensorFlow, and writes the same features."""
    import subprocess
    import sys

    from conftest import REPO

    arrays_dir = tmp_path / "arrays"
    arrays.preprocess(kaggle_dataset, 32, out_dir=arrays_dir, workers=1, progress=False)
    name, other = register_tiny_backbone(32), register_tiny_backbone(24)
    first = extract_random(
        kaggle_dataset,
        arrays_dir,
        tmp_path / "first.h5",
        name,
        runtime="litert",
        workers=1,
        export_ahead=(other,),
    )
    assert len(list((keras_home / "litert").glob("*.record.json"))) == 2
    other_arrays = tmp_path / "arrays24"
    arrays.preprocess(kaggle_dataset, 24, out_dir=other_arrays, workers=1, progress=False)
    code = (
        "import sys\n"
        "from conftest import extract_random, register_tiny_backbone\n"
        f"for size, arrays, out in ((32, {str(arrays_dir)!r}, 'again.h5'),"
        f" (24, {str(other_arrays)!r}, 'other.h5')):\n"
        f"    extract_random({str(kaggle_dataset)!r}, arrays, {str(tmp_path)!r} + '/' + out,"
        " register_tiny_backbone(size), runtime='auto', devices='cpu', workers=1)\n"
        "started = {'keras', 'tensorflow'} & set(sys.modules)\n"
        "assert not started, started\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO / 'tests'}",
        "KERAS_HOME": str(keras_home),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Exporting" not in result.stdout
    again = features.load_features(tmp_path / "again.h5", "train")
    np.testing.assert_array_equal(
        again["features"], features.load_features(first, "train")["features"]
    )
    assert again["attrs"]["runtime"] == "litert"
    assert (
        again["attrs"]["keras_version"]
        == features.load_features(first, "train")["attrs"]["keras_version"]
    )
    assert features.load_features(tmp_path / "other.h5", "test")["features"].shape[1] == 8


def test_a_record_is_stale_once_a_weights_file_or_the_export_changes(tmp_path, keras_home):
    model, spec = _tiny(16)
    weights_file = tmp_path / "weights.h5"
    weights_file.write_bytes(b"weights")
    source = litert.Source("imagenet", None, (weights_file,))
    path = litert.export(model, spec, spec.name, log=lambda line: None, source=source)
    assert litert.recorded_export(spec, spec.name, source) == path
    for other in (
        litert.Source("imagenet", str(tmp_path), (weights_file,)),  # another WEIGHTS_DIR
        litert.Source("random", None, ()),  # never recorded
        litert.Source("imagenet", None, None),  # files unknown: never looked up
    ):
        assert litert.recorded_export(spec, spec.name, other) is None
    os.utime(weights_file, ns=(1, 1))  # the weights file replaced behind the tool's back
    assert litert.recorded_export(spec, spec.name, source) is None
    litert.export(model, spec, spec.name, log=lambda line: None, source=source)  # re-recorded
    assert litert.recorded_export(spec, spec.name, source) == path
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    assert litert.recorded_export(spec, spec.name, source) is None


def test_litert_is_chosen_without_keras_only_where_it_surely_would_be(monkeypatch, tmp_path):
    monkeypatch.setattr(litert, "GPU_DEVICE_NODES", ())
    monkeypatch.setattr(litert.sys, "platform", "linux")
    assert litert.wanted_without_keras("auto", "float32", "auto")
    assert litert.wanted_without_keras("litert", "float32", "2")
    assert not litert.wanted_without_keras("keras", "float32", "cpu")
    assert not litert.wanted_without_keras("auto", "bfloat16", "cpu")
    assert not litert.wanted_without_keras("auto", "float32", "2")
    monkeypatch.setattr(litert, "GPU_DEVICE_NODES", (str(tmp_path),))  # a GPU's device node
    assert not litert.wanted_without_keras("auto", "float32", "auto")
    assert litert.wanted_without_keras("auto", "float32", "cpu")
    monkeypatch.setattr(litert, "configured_backend", lambda: "jax")
    assert not litert.wanted_without_keras("litert", "float32", "cpu")


def test_the_backend_is_read_as_keras_reads_it(monkeypatch, tmp_path):
    monkeypatch.delitem(litert.sys.modules, "keras")  # as if Keras were not started
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert litert.configured_backend() == "tensorflow"
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    assert litert.configured_backend() == "jax"
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert litert.configured_backend() == "torch"


def test_a_backbone_that_fails_to_export_ahead_is_one_line_not_a_failure(monkeypatch):
    """Exporting the run's other backbones is a favour to their own extractions: a failure
    there (weights not to be had, a network that does not build) is one line, and the
    extraction that tried goes on."""
    name = register_tiny_backbone(16)

    def broken(*args, **kwargs):
        raise OSError("no such weights file\nmore detail")

    monkeypatch.setattr(features, "build_model", broken)
    lines: list[str] = []
    monkeypatch.setattr(features, "_say", lines.append)
    features.export_ahead([name], "random", None, None)
    assert lines == [f"{name} was not exported ahead (no such weights file)"]
