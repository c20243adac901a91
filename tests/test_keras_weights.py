"""keras.applications weights through Keras's own download, with no network.

A local HTTP server on 127.0.0.1 stands in for the weights host: Keras's `get_file` downloads
through `file_utils.urlretrieve`, which the tests point at the server (same path, local host)
while recording the URL Keras asked for. The served file is a random-weight no-top model saved
under Keras's real file name; the expected hash is switched to that file's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from keras.src.backend import config as keras_config
from keras.src.legacy.saving import legacy_h5_format
from keras.src.utils import file_utils

from dogscats import backbones
from dogscats.backbones import weights as weights_module

NAME = "mobilenet_v3_small"  # small, and Keras checks its file's hash
SIZE = 32
KERAS_ENTRIES = [
    n for n in backbones.list_backbones() if backbones.get_backbone(n).weights_source == "keras"
]


class WeightsHost:
    """Files by URL path on 127.0.0.1; `requests` lists the original URLs Keras asked for."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        files = self.files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_HEAD(self):  # noqa: N802 (http.server's name)
                self.send_response(200 if self.path in files else 404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def urlretrieve(self, url, filename=None, reporthook=None, data=None):
        self.requests.append(url)
        path = urllib.parse.urlsplit(url).path
        local = f"http://127.0.0.1:{self.server.server_port}{path}"
        return urllib.request.urlretrieve(local, filename, reporthook, data)


@pytest.fixture
def host(monkeypatch, tmp_path):
    """The stand-in host, an empty KERAS_HOME, and Keras's downloads routed to the host."""
    served = WeightsHost()
    monkeypatch.setattr(file_utils, "urlretrieve", served.urlretrieve)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    yield served
    served.server.shutdown()


@pytest.fixture(scope="module")
def random_file(tmp_path_factory):
    """(model, bytes): a random-weight no-top model and its weights in Keras's legacy .h5."""
    spec = backbones.get_backbone(NAME)
    model = spec.build_fn()(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    path = tmp_path_factory.mktemp("served") / "weights.h5"
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    return model, path.read_bytes()


@pytest.fixture
def source(monkeypatch, random_file):
    """Keras's own file name and URL for NAME, expecting the served file's hash."""
    real = backbones.keras_weights(backbones.get_backbone(NAME), SIZE)
    digest = hashlib.sha256(random_file[1]).hexdigest()
    patched = dataclasses.replace(real, file_hash=digest)
    monkeypatch.setattr(weights_module, "_learn", lambda builder, size: patched)
    return patched


def _serve(host: WeightsHost, source, body: bytes) -> None:
    host.files[urllib.parse.urlsplit(source.origin).path] = body


def test_an_empty_keras_home_downloads_checks_and_caches(host, source, random_file, tmp_path):
    model, body = random_file
    _serve(host, source, body)
    built = backbones.build_backbone(NAME, weights="imagenet", input_size=SIZE, pooling=None)
    cached = tmp_path / "keras_home" / "models" / source.fname
    assert host.requests == [source.origin] and cached.read_bytes() == body
    for mine, theirs in zip(built.weights, model.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    # The second run reads the cache: no request.
    assert backbones.resolve_keras_weights(backbones.get_backbone(NAME)) == str(cached)
    assert host.requests == [source.origin]


def test_a_missing_file_stops_with_the_name_the_url_and_the_offline_choices(host, source):
    with pytest.raises(backbones.WeightsUnavailableError) as error:
        backbones.resolve_keras_weights(backbones.get_backbone(NAME), "/nowhere")
    message = str(error.value)
    assert host.requests == [source.origin]
    for part in (
        source.fname,
        source.origin,
        "404",
        "/nowhere",
        "BACKBONES=offline",
        "WEIGHTS=random",
    ):
        assert part in message


def test_a_corrupt_download_is_refused_and_not_cached(host, source, random_file, tmp_path):
    _serve(host, source, random_file[1][:1000])
    with pytest.raises(backbones.WeightsUnavailableError) as error:
        backbones.resolve_keras_weights(backbones.get_backbone(NAME))
    assert source.fname in str(error.value) and "hash" in str(error.value)
    assert not (tmp_path / "keras_home" / "models" / source.fname).exists()


def test_weights_dir_is_used_by_keras_name_and_a_truncated_file_is_refused(
    host, source, random_file, tmp_path
):
    spec = backbones.get_backbone(NAME)
    local = tmp_path / "weights_dir" / source.fname
    local.parent.mkdir()
    local.write_bytes(random_file[1])
    assert backbones.resolve_keras_weights(spec, str(local.parent)) == str(local)
    local.write_bytes(random_file[1][:1000])
    with pytest.raises(backbones.WeightsUnavailableError, match="truncated") as error:
        backbones.resolve_keras_weights(spec, str(local.parent))
    assert str(local) in str(error.value) and source.origin in str(error.value)
    assert host.requests == []


def _keras_builder_request(spec, size: int, monkeypatch, home: Path) -> str:
    """The URL that Keras's builder itself requests with weights="imagenet"."""
    asked: list[str] = []

    def record(url, *args, **kwargs):
        asked.append(url)
        raise OSError("recorded")

    with monkeypatch.context() as patch:
        patch.setattr(file_utils, "urlretrieve", record)
        patch.setattr(keras_config, "keras_home", lambda: str(home))
        with keras.StatelessScope(initialize_variables=False), pytest.raises(OSError):
            spec.build_fn()(include_top=False, weights="imagenet", input_shape=(size, size, 3))
    return asked[0]


@pytest.mark.parametrize("name", KERAS_ENTRIES)
def test_we_request_the_url_the_keras_builder_requests(name, host, monkeypatch, tmp_path):
    spec = backbones.get_backbone(name)
    expected = _keras_builder_request(spec, spec.input_size, monkeypatch, tmp_path / "other")
    with pytest.raises(backbones.WeightsUnavailableError):
        backbones.resolve_keras_weights(spec)
    assert host.requests == [expected]


def test_the_check_before_preprocessing_finds_the_file_or_a_server_and_downloads_nothing(
    host, source, random_file, tmp_path, monkeypatch
):
    """`make`'s arrays rule runs check_keras_weights first: weights in WEIGHTS_DIR, in Keras's
    cache (hash-checked) or on a server that answers pass; otherwise one line, before the
    arrays are built. The real origin is put on the local host here."""
    spec, body = backbones.get_backbone(NAME), random_file[1]
    path = urllib.parse.urlsplit(source.origin).path
    local = dataclasses.replace(source, origin=f"http://127.0.0.1:{host.server.server_port}{path}")
    monkeypatch.setattr(weights_module, "_learn", lambda builder, size: local)
    with pytest.raises(backbones.WeightsUnavailableError) as error:
        weights_module.check_keras_weights(spec)  # nowhere on disk, and the server lacks it
    message = str(error.value)
    assert "\n" not in message and source.fname in message and "404" in message
    assert "BACKBONES=offline" in message

    _serve(host, source, body)
    weights_module.check_keras_weights(spec)  # downloadable
    cached = tmp_path / "keras_home" / "models" / source.fname
    assert not cached.exists() and host.requests == []  # checked, not downloaded

    host.files.clear()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(body)
    weights_module.check_keras_weights(spec)  # in Keras's cache
    cached.write_bytes(body[:1000])
    with pytest.raises(backbones.WeightsUnavailableError, match="404"):
        weights_module.check_keras_weights(spec)  # a cut cache file would be downloaded again
    folder = tmp_path / "weights_dir"
    folder.mkdir()
    (folder / source.fname).write_bytes(body)
    weights_module.check_keras_weights(spec, str(folder))  # WEIGHTS_DIR
