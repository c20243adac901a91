"""KerasHub presets as backbones, offline: a tiny random DINOv2 that the test saves as a preset
folder (backbone and image converter) and loads back by path."""

from __future__ import annotations

import builtins
import json
import sys

import numpy as np
import pytest
from conftest import plan_without_heavy_imports

from dogscats import backbones, config, features
from dogscats.backbones import hub

SIZE = 28  # 7 x 7 patches of 4 pixels
SCALE = [1 / (255 * s) for s in (0.229, 0.224, 0.225)]
OFFSET = [-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]


def tiny_dinov2():
    keras_hub = pytest.importorskip("keras_hub")  # the [hub] extra, which [dev] includes
    return keras_hub.models.DINOV2Backbone(
        patch_size=4,
        num_layers=2,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(SIZE, SIZE, 3),
        position_embedding_shape=(SIZE, SIZE, 3),
    )


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """(folder, the saved backbone) of a random tiny DINOv2 with its converter."""
    folder = tmp_path_factory.mktemp("hub") / "tiny_dinov2"
    backbone = tiny_dinov2()
    backbone.save_to_preset(str(folder))
    converter = pytest.importorskip("keras_hub").layers.DINOV2ImageConverter(
        image_size=(SIZE, SIZE), scale=SCALE, offset=OFFSET
    )
    converter.save_to_preset(str(folder))
    return folder, backbone


def test_a_preset_folder_is_a_backbone_with_its_converters_size_and_scaling(preset):
    folder, _ = preset
    name = f"hub:{folder}"
    assert backbones.check_name(name) == name
    assert backbones.input_size(name) == SIZE  # read from image_converter.json
    spec = backbones.get_backbone(name)
    assert spec.input_size == SIZE and spec.feature_dim == 16
    x = np.full((1, 2, 2, 3), 255.0, dtype="float32")
    expected = 255.0 * np.array(SCALE) + np.array(OFFSET)
    assert np.allclose(spec.preprocess_fn()(x)[0, 0, 0], expected, atol=1e-5)


def test_features_are_the_backbones_own_output_averaged_over_its_tokens(preset):
    folder, saved = preset
    spec = backbones.get_backbone(f"hub:{folder}")
    model = features.build_model(spec, "imagenet", None, "float32")
    rng = np.random.default_rng(0)
    x = spec.preprocess_fn()(rng.uniform(0, 255, (3, SIZE, SIZE, 3)).astype("float32"))
    ours = np.asarray(model(x, training=False))
    tokens = np.asarray(saved({"images": x}, training=False))  # (batch, 1 + 49 patches, 16)
    assert tokens.shape == (3, 50, 16) and ours.shape == (3, 16)
    assert np.allclose(ours, tokens.mean(axis=1), atol=1e-5)


def test_random_weights_differ_from_the_presets(preset):
    folder, saved = preset
    spec = backbones.get_backbone(f"hub:{folder}")
    random = backbones.build_backbone(spec.name, weights="random")
    x = np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)).astype("float32")
    assert not np.allclose(np.asarray(random(x)), np.asarray(saved({"images": x})).mean(axis=1))


def test_an_inner_layer_of_a_preset_is_pooled(preset):
    folder, saved = preset
    spec = backbones.get_backbone(f"hub:{folder}")
    listed = backbones.layers.block_ends(backbones.layers.symbolic_backbone(spec.name), spec)
    (name,) = [n for n in listed if n.endswith("embeddings")]  # KerasHub prefixes the model's
    assert listed[name] == (None, 50, 16)
    model = features.build_model(spec, "imagenet", None, "float32", layer=name)
    x = np.random.default_rng(2).normal(size=(2, SIZE, SIZE, 3)).astype("float32")
    embeddings = saved.get_layer("embeddings")(x)
    assert np.allclose(np.asarray(model(x)), np.asarray(embeddings).mean(axis=1), atol=1e-5)


def test_file_and_run_names_are_safe_and_tell_folders_apart(preset, tmp_path):
    folder, _ = preset
    name = f"hub:{folder}"
    path = config.feature_path(tmp_path, name, tta="flip")
    assert path.name.startswith("hub-tiny_dinov2-") and path.name.endswith(".flip.h5")
    assert ":" not in path.name and "/" not in path.name
    other = tmp_path / "elsewhere" / "tiny_dinov2"
    assert config.backbone_stem(f"hub:{other}") != config.backbone_stem(name)
    assert config.backbone_stem("hub:dinov2_base") == "hub-dinov2_base"
    assert config.head_run_name([name, "resnet50"], "logreg").endswith("+resnet50__logreg")


def test_a_folder_without_a_converter_is_refused_not_guessed(tmp_path):
    folder = tmp_path / "no_converter"
    tiny_dinov2().save_to_preset(str(folder))
    with pytest.raises(ValueError, match="no image_converter.json.*not guessed"):
        backbones.input_size(f"hub:{folder}")


def test_bad_folders_stop_with_one_line(tmp_path):
    with pytest.raises(ValueError, match="no preset folder at"):
        backbones.check_name(f"hub:{tmp_path}/missing")
    with pytest.raises(ValueError, match="has no config.json"):
        backbones.check_name(f"hub:{tmp_path}")
    with pytest.raises(ValueError, match="needs a preset"):
        backbones.check_name("hub:")


def test_a_mistyped_preset_name_suggests_keras_hubs_own_names():
    pytest.importorskip("keras_hub")
    with pytest.raises(ValueError, match="no preset of that name. Did you mean: dinov2_base"):
        backbones.input_size("hub:dinov2_bas")  # offline: the name is checked before any fetch


def test_without_keras_hub_a_clear_line_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_keras_hub(name, *args, **kwargs):
        if name == "keras_hub" or name.startswith("keras_hub."):
            raise ImportError("No module named 'keras_hub'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_keras_hub)
    monkeypatch.delitem(sys.modules, "keras_hub", raising=False)
    with pytest.raises(ValueError, match=r"need KerasHub.*pip install '\.\[hub\]'"):
        hub.keras_hub()
    hub.image_settings.cache_clear()
    with pytest.raises(ValueError, match=r"pip install '\.\[hub\]'"):
        backbones.input_size("hub:dinov2_base")  # a named preset needs KerasHub to be read


def test_make_plans_a_preset_folder_with_the_standard_library(preset):
    """The size of a local Keras-format preset comes from its JSON: no Keras in the plan."""
    folder, _ = preset
    args = ["--backbones", f"hub:{folder}", "--weights", "random"]
    out = plan_without_heavy_imports(args, {"numpy", "tensorflow", "keras", "keras_hub"})
    assert f"/arrays/{SIZE}/manifest.json" in out
    assert f"EXTRACT_BACKBONE := hub:{folder}" in out
    assert json.loads((folder / "image_converter.json").read_text())["config"]["image_size"]


def test_extract_writes_the_presets_pooled_features(preset, kaggle_dataset, tmp_path):
    """Through the feature stage: arrays at the converter's size, the converter's scaling,
    the backbone's tokens averaged."""
    from dogscats import arrays

    folder, saved = preset
    name = f"hub:{folder}"
    arrays_dir = tmp_path / "arrays"
    arrays.preprocess(kaggle_dataset, SIZE, out_dir=arrays_dir, workers=1, progress=False)
    out = features.extract(
        kaggle_dataset,
        name,
        arrays_dir=arrays_dir,
        out=tmp_path / "f.h5",
        batch_size=4,
        progress=False,
    )
    train = features.load_features(out, "train")
    assert train["features"].shape == (16, 16) and train["attrs"]["backbone"] == name
    assert train["attrs"]["weights_source"] == "keras_hub"
    images, _ = arrays.load_split(arrays_dir, "train")
    x = hub.rescale(images.astype("float32"), SCALE, OFFSET)
    expected = np.asarray(saved({"images": x}, training=False)).mean(axis=1)
    assert np.allclose(train["features"], expected, atol=1e-4)
