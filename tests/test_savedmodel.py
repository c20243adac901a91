"""SavedModel feature vectors (TF Hub's convention) as backbones, on models the tests export."""

from __future__ import annotations

import numpy as np
import pytest

from dogscats import backbones, config, features

tf = pytest.importorskip("tensorflow")

SIZE = 16


class FeatureVector(tf.Module):
    """A tiny feature-vector model: [0, 1] RGB -> (batch, 5), a conv then a spatial mean."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.kernel = tf.Variable(rng.normal(size=(3, 3, 3, 5)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32)])
    def __call__(self, images):
        maps = tf.nn.relu(tf.nn.conv2d(images, self.kernel, strides=2, padding="SAME"))
        return tf.reduce_mean(maps, axis=[1, 2])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(folder with a serving signature, folder with only __call__, the module)."""
    root = tmp_path_factory.mktemp("savedmodel")
    module = FeatureVector()
    signed, plain = root / "signed", root / "plain"
    tf.saved_model.save(module, str(signed), signatures={"serving_default": module.__call__})
    tf.saved_model.save(module, str(plain))
    return signed, plain, module


def test_features_equal_the_savedmodel_called_directly(exported):
    signed, plain, module = exported
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
    expected = module(tf.constant(images / 255.0)).numpy()
    for folder in (signed, plain):  # the serving signature, and TF Hub's restored __call__
        name = f"savedmodel:{folder}:{SIZE}"
        assert backbones.input_size(name) == SIZE
        spec = backbones.get_backbone(name)
        assert spec.feature_dim == 5 and spec.weights_source == "savedmodel"
        model = features.build_model(spec, "imagenet", None, "float32")
        ours = np.asarray(model(spec.preprocess_fn()(images)))
        assert np.allclose(ours, expected, atol=1e-5)


def test_names_are_file_safe_per_folder_and_size(exported, tmp_path):
    signed, _, _ = exported
    stem = config.backbone_stem(f"savedmodel:{signed}:{SIZE}")
    assert stem.startswith(f"savedmodel-signed_{SIZE}-") and ":" not in stem
    assert stem != config.backbone_stem(f"savedmodel:{signed}:{SIZE * 2}")


def test_a_missing_folder_or_a_bad_name_stops_with_one_line(tmp_path):
    with pytest.raises(ValueError, match="no SavedModel in .*no saved_model.pb"):
        backbones.check_name(f"savedmodel:{tmp_path}:224")
    with pytest.raises(ValueError, match=r"savedmodel:<dir>:<size>.*Received: savedmodel:x"):
        backbones.check_name("savedmodel:x")


def test_a_model_of_another_signature_is_refused(exported, tmp_path):
    class TwoInputs(tf.Module):
        @tf.function(
            input_signature=[
                tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32),
                tf.TensorSpec((None,), tf.int32),
            ]
        )
        def __call__(self, images, ids):
            return tf.reduce_mean(images, axis=[1, 2])

    module = TwoInputs()
    folder = tmp_path / "two_inputs"
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.__call__})
    with pytest.raises(ValueError, match=r"feature-vector model takes one float batch"):
        backbones.get_backbone(f"savedmodel:{folder}:{SIZE}")
    signed, _, _ = exported
    with pytest.raises(ValueError, match=r"takes one float batch of shape \(None, 32, 32, 3\)"):
        backbones.get_backbone(f"savedmodel:{signed}:32")  # the wrong size in the name


def test_random_weights_and_layers_do_not_apply(exported):
    signed, _, _ = exported
    name = f"savedmodel:{signed}:{SIZE}"
    with pytest.raises(ValueError, match="weights are inside the SavedModel"):
        backbones.build_backbone(name, weights="random")
    with pytest.raises(ValueError, match="SavedModel, whose inner layers are not reachable"):
        features.build_model(backbones.get_backbone(name), "imagenet", None, "float32", "conv")
