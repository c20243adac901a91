"""LAYER: features pooled from an inner layer, named apart, listed by `make layers`."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from dogscats import arrays, cli, config, features, plan
from dogscats.backbones import build_backbone, get_backbone, layers

NAME, LAYER = "mobilenet", "conv_pw_5_relu"  # a cheap backbone; its 28 x 28 x 256 block end


def test_the_block_ends_of_vgg16_are_its_pools_with_their_shapes(capsys):
    assert cli.main(["layers", "vgg16"]) == 0
    out = capsys.readouterr().out
    assert "block4_pool" in out and "(None, 14, 14, 512)" in out and "-> 512 features" in out
    ends = layers.block_ends(layers.symbolic_backbone("vgg16"), get_backbone("vgg16"))
    assert list(ends) == [f"block{i}_pool" for i in range(1, 6)]


def test_families_without_named_blocks_list_their_stage_ends():
    ends = layers.block_ends(
        layers.symbolic_backbone("convnext_tiny"), get_backbone("convnext_tiny")
    )
    sizes = [shape[1] for shape in ends.values()]
    assert sizes == [56, 28, 14, 7]  # one per stage, none at the input's size


def test_an_unknown_layer_suggests_close_names_before_any_weights(monkeypatch):
    monkeypatch.setattr(features, "build_backbone", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(ValueError, match="Did you mean: block4_pool"):
        features.build_model(get_backbone("vgg16"), "random", None, "float32", "block4_pol")
    assert cli.main(["layers", "vgg16", "--check", "block4_pool"]) == 0
    assert cli.main(["layers", "vgg16", "--check", "block4_pol"]) == 2


def test_layer_features_are_that_layers_output_averaged():
    spec = get_backbone(NAME)
    model = features.build_model(spec, "random", None, "float32", LAYER)
    assert model.output_shape == (None, 256)
    # The same weights: the whole backbone's layer, read directly.
    import keras

    whole = keras.Model(model.inputs[0], model.get_layer(LAYER).output)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype("float32")
    assert np.allclose(np.asarray(model(x)), np.asarray(whole(x)).mean(axis=(1, 2)), atol=1e-5)


def test_extract_names_the_layer_in_the_file_and_its_attrs(kaggle_dataset, tmp_path):
    arrays_dir = tmp_path / "arrays"
    arrays.preprocess(kaggle_dataset, 224, out_dir=arrays_dir, workers=1, progress=False)
    common = {"weights": "random", "arrays_dir": arrays_dir, "batch_size": 8, "progress": False}
    path = config.feature_path(kaggle_dataset, NAME, weights="random", layer=LAYER)
    assert path.name == f"{NAME}@{LAYER}.random.h5"
    out = features.extract(kaggle_dataset, NAME, out=tmp_path / path.name, layer=LAYER, **common)
    with h5py.File(out) as f:
        assert f["train/features"].shape == (16, 256)
        assert f.attrs["layer"] == LAYER and f.attrs["feature_dim"] == 256
    top = features.extract(kaggle_dataset, NAME, out=tmp_path / "top.h5", **common)
    with h5py.File(top) as f:
        assert f["train/features"].shape == (16, 1024) and "layer" not in f.attrs


def test_plan_names_layer_runs_apart_and_keeps_fine_tuning_whole():
    lines = plan.plan(plan.Variables(backbones="vgg16", layer="block4_pool", weights="random"))
    text = "\n".join(lines)
    assert "vgg16@block4_pool.random.h5: EXTRACT_LAYER := block4_pool" in text
    assert "/models/vgg16@block4_pool__logreg__random" in text
    assert "vgg16@block4_pool" not in [line for line in lines if "FT_" in line][0]
    for variables, message in (
        ({"layer": "x", "head": "finetune"}, "LAYER=x applies to the features"),
        ({"layer": "a b"}, "LAYER must be a Keras layer name"),
    ):
        assert message in plan.as_make(plan.Variables(**variables))


def test_a_layered_build_shares_the_backbones_graph():
    """The cut model is the whole backbone's graph up to the layer, not a copy."""
    whole = build_backbone(NAME, weights="random", pooling=None)
    cut = layers.pooled_at(whole, LAYER)
    assert cut.get_layer(LAYER) is whole.get_layer(LAYER)


def test_make_checks_the_layer_before_decoding_and_passes_it_to_extraction(kaggle_dataset):
    import subprocess

    from conftest import REPO

    args = [f"DATA_DIR={kaggle_dataset}", "BACKBONES=vgg16", "LAYER=block4_pool"]
    result = subprocess.run(
        ["make", "-C", str(REPO), "-n", "submission", *args], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    commands = result.stdout
    check = commands.index("layers --check 'block4_pool' vgg16")
    assert check < commands.index("cli preprocess") < commands.index("--layer block4_pool")
    assert "vgg16@block4_pool.h5" in commands


def test_an_automatically_named_layer_from_the_list_is_found_when_extracting():
    """MobileNetV3's layers are named by Keras's counter (`activation_11`): the listed name
    must reach the same layer although other models were built in between."""
    import re

    spec = get_backbone("mobilenet_v3_small")
    ends = layers.block_ends(layers.symbolic_backbone(spec.name), spec)
    auto = [name for name in ends if re.fullmatch(r"[a-z_]+_\d+", name)]
    assert len(auto) >= 3
    name = auto[1]
    build_backbone(NAME, weights="random")  # moves Keras's counters on
    model = features.build_model(spec, "random", None, "float32", name)
    assert model.output_shape == (None, ends[name][-1])
    assert model.get_layer(name).output.shape == ends[name]
