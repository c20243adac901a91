"""LiteRT runtime: features within litert.MATCH_TOLERANCE of Keras's, the export cache (reused,
keyed by weights and size, a damaged file set aside and rebuilt), and auto's fallback line."""

from __future__ import annotations

import dataclasses

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
