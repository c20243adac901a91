"""Decoding one image file: odd formats, truncation, resizing, the reference images."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from dogscats.arrays.decode import (
    BadImageError,
    decode_image,
    load_image,
    resize_image,
    structural_problem,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
EDGE_CASES = SHARED / "data" / "edge-cases"
SAMPLE = SHARED / "data" / "dogs-vs-cats-sample"
REFERENCE = SHARED / "data" / "reference" / "efficientnet_lite0.npz"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs ../shared beside the checkout")
    return path


def encode(rgb: np.ndarray, ext: str = ".jpg", *params: int) -> bytes:
    """Encoded bytes of an RGB (or RGBA / gray) image; OpenCV encoders take BGR(A)."""
    if rgb.ndim == 3 and rgb.shape[2] == 3:
        rgb = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    elif rgb.ndim == 3:
        rgb = cv2.cvtColor(rgb, cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(ext, rgb, list(params))
    assert ok
    return buf.tobytes()


def solid(rgb: tuple[int, int, int], h: int = 12, w: int = 20) -> np.ndarray:
    return np.full((h, w, 3), rgb, dtype=np.uint8)


def noisy(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_decode_is_rgb_not_bgr(tmp_path):
    path = tmp_path / "red.jpg"
    path.write_bytes(encode(solid((255, 0, 0)), ".jpg", cv2.IMWRITE_JPEG_QUALITY, 100))
    image = decode_image(path)
    assert image.shape == (12, 20, 3) and image.dtype == np.uint8
    assert image[..., 0].min() >= 250 and image[..., 2].max() <= 5


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    path = tmp_path / "gray.jpg"
    path.write_bytes(encode(gray, ".png"))
    image = decode_image(path)
    assert image.shape == (12, 20, 3)
    np.testing.assert_array_equal(image[..., 0], gray)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_png_bytes_behind_jpg_name_decode_exactly(tmp_path):
    rgb = noisy()
    path = tmp_path / "cat.1.jpg"
    path.write_bytes(encode(rgb, ".png"))
    np.testing.assert_array_equal(decode_image(path), rgb)


def test_alpha_is_dropped_keeping_colour(tmp_path):
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 1] = 200  # green
    rgba[..., 3] = np.arange(10, dtype=np.uint8)[:, None] * 25  # varying transparency
    path = tmp_path / "alpha.jpg"
    path.write_bytes(encode(rgba, ".png"))
    image = decode_image(path)
    assert image.shape == (10, 10, 3)
    np.testing.assert_array_equal(image, np.broadcast_to([0, 200, 0], (10, 10, 3)))


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"<html>not an image</html>\n", "not a decodable"),
        (np.random.default_rng(1).bytes(4096), "not a decodable"),
    ],
)
def test_unusable_bytes_raise_bad_image(tmp_path, content, reason):
    path = tmp_path / "x.jpg"
    path.write_bytes(content)
    with pytest.raises(BadImageError, match=reason) as info:
        decode_image(path)
    assert info.value.path == str(path)


def test_truncated_jpeg_is_bad(tmp_path):
    whole = encode(noisy(64, 64))
    path = tmp_path / "cut.jpg"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BadImageError, match="truncated"):
        decode_image(path)
    path.write_bytes(whole[:-2])  # only the end-of-image marker missing
    with pytest.raises(BadImageError, match="truncated"):
        decode_image(path)


def test_truncation_check_on_marker_layout():
    whole = encode(noisy(16, 16))
    assert structural_problem(whole) is None
    assert structural_problem(whole + b"\0" * 100) is None  # padding after EOI is fine
    # An EXIF-like thumbnail ends with FFD9 early; cutting the main scan must still be bad.
    thumb = b"\xff\xd8\xff\xe1" + b"\xff\xda" + b"thumb" + b"\xff\xd9"
    with_thumb = whole[:2] + thumb + whole[2:]
    assert structural_problem(with_thumb) is None
    assert "truncated" in structural_problem(with_thumb[: len(with_thumb) - 40])
    png = encode(noisy(8, 8), ".png")
    assert structural_problem(png) is None
    assert "PNG" in structural_problem(png[: len(png) // 2])


def test_bad_image_error_survives_pickling():
    error = pickle.loads(pickle.dumps(BadImageError("a/cat.1.jpg", "empty file")))
    assert (error.path, error.reason) == ("a/cat.1.jpg", "empty file")
    assert str(error) == "a/cat.1.jpg: empty file"


def test_missing_file_is_bad(tmp_path):
    with pytest.raises(BadImageError, match="cannot read"):
        decode_image(tmp_path / "absent.jpg")


def test_resize_is_square_bilinear():
    rgb = noisy(30, 50)
    out = resize_image(rgb, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.resize(rgb, (16, 16), interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize("shape", [(30, 50), (16, 16)])  # resized, and already square
def test_resize_into_out_fills_it_in_place(shape):
    rgb = noisy(*shape)
    out = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    returned = resize_image(rgb, 16, out=out[2])
    assert np.shares_memory(returned, out)
    np.testing.assert_array_equal(out[2], resize_image(rgb, 16))
    assert not out[[0, 1, 3]].any()


def test_edge_cases_ok_load_bad_raise():
    folder = need(EDGE_CASES)
    expected = {}
    for line in (folder / "README.txt").read_text().splitlines():
        name, _, rest = line.partition(": ")
        if rest.startswith(("ok", "bad")):
            expected[name] = rest.split(":")[0]
    assert len(expected) == 11
    for name, verdict in expected.items():
        if verdict == "ok":
            image = decode_image(folder / name)
            assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, name
        else:
            with pytest.raises(BadImageError):
                decode_image(folder / name)


def test_reproduces_reference_images():
    reference = np.load(need(REFERENCE))
    for name, expected in zip(reference["files"], reference["images"], strict=True):
        ours = load_image(need(SAMPLE) / "train" / str(name), expected.shape[0])
        diff = np.abs(ours.astype(np.int16) - expected.astype(np.int16)).max()
        assert diff <= 1, f"{name}: off by {diff} grey levels"
