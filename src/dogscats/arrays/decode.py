"""One image file to a model-ready uint8 RGB square, or a BadImageError saying why not.

Decoding goes by content (PNG bytes behind a .jpg name decode), rejects truncated files that
some OpenCV builds would half-decode in grey, and keeps libjpeg's warnings off the terminal:
bad files are reported by name instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

_JPEG_SOI = b"\xff\xd8"
_JPEG_SOS = b"\xff\xda"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND"
# Color decode straight to RGB where OpenCV has it (>= 4.11): saves a cvtColor per image.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
# Below this many pixels a side an image shows no animal, only a blur of colour once resized
# to the input size; README ("What can go wrong") says why 16 (preprocessing passes it).
MIN_SIDE = 16


class BadImageError(ValueError):
    """A file that cannot be used as an image; `path` and `reason` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across worker processes despite the two-argument init
        return type(self), (self.path, self.reason)


class TinyImageError(BadImageError):
    """An image that decodes, but with a side under the minimum asked for."""


_MUTED_STDERR: tuple[int, int] | None = None  # (/dev/null fd, saved fd 2) once muted


def quiet_opencv(mute_stderr: bool = False) -> None:
    """Keep decoder warnings ("Corrupt JPEG data ...") off the terminal: bad files are reported
    by name in report.csv instead, and thousands of warnings would bury the progress bar.

    OpenCV's own messages obey its log level, but libjpeg writes straight to fd 2. With
    `mute_stderr`, fd 2 points at /dev/null during each imdecode call; meant for worker
    processes, where nothing else is writing to stderr at that moment.
    """
    global _MUTED_STDERR
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    if mute_stderr and _MUTED_STDERR is None:
        _MUTED_STDERR = (os.open(os.devnull, os.O_WRONLY), os.dup(2))


@contextmanager
def _decoder_output_muted() -> Iterator[None]:
    if _MUTED_STDERR is None:
        yield
        return
    devnull, saved = _MUTED_STDERR
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)


def structural_problem(data: bytes) -> str | None:
    """Why these bytes are an incomplete JPEG/PNG, or None when they look whole.

    Needed because some OpenCV builds half-decode a truncated JPEG without any error (the
    missing part comes back grey). A complete JPEG ends its last scan with the end-of-image
    marker: inside entropy-coded data 0xFF is always stuffed (FF00) or a restart marker, so
    FFD9 after the last start-of-scan (FFDA) cannot appear by accident. Comparing positions
    rather than only looking at the last bytes accepts trailing padding after EOI, and rejects
    a truncated file even when an embedded EXIF thumbnail contributes an earlier FFD9.
    """
    if data.startswith(_JPEG_SOI):
        last_scan = data.rfind(_JPEG_SOS)
        if last_scan < 0:
            return "JPEG has no image data (no start-of-scan marker)"
        if data.rfind(_JPEG_EOI) < last_scan:
            return "truncated JPEG (no end-of-image marker after the last scan)"
    elif data.startswith(_PNG_SIGNATURE) and _PNG_IEND not in data[-64:]:
        # Checked before decoding so libpng never prints its "incomplete buffer" error.
        return "truncated PNG (no IEND chunk)"
    return None


def decode_bytes(data: bytes, path: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to an (H, W, 3) uint8 RGB array or raise BadImageError."""
    if not data:
        raise BadImageError(path, "empty file")
    problem = structural_problem(data)
    if problem:
        raise BadImageError(path, problem)
    buf = np.frombuffer(data, dtype=np.uint8)  # a view, no copy
    # IMREAD_COLOR(_RGB) makes grayscale 3-channel and drops alpha, exactly as cv2.imread does,
    # so arrays match the reference pipeline; imdecode goes by content, not by the file name.
    flag = cv2.IMREAD_COLOR if _IMREAD_RGB is None else _IMREAD_RGB
    with _decoder_output_muted():
        rgb = cv2.imdecode(buf, flag)
    if rgb is None or rgb.size == 0:
        raise BadImageError(path, "not a decodable image")
    if _IMREAD_RGB is None:
        rgb = cv2.cvtColor(rgb, cv2.COLOR_BGR2RGB)  # OpenCV < 4.11 decodes to BGR only
    return rgb


def decode_image(path: str | os.PathLike, min_side: int = 0) -> np.ndarray:
    """Read one image file as (H, W, 3) uint8 RGB; raise BadImageError when it is unusable,
    TinyImageError when a side is under `min_side` pixels.

    Bytes are read by Python (not cv2.imread) so read errors surface with a reason, PNG bytes
    behind a .jpg name decode by content, and the truncation check can search the raw bytes.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadImageError(path, f"cannot read file: {exc.strerror or exc}") from exc
    rgb = decode_bytes(data, path)
    height, width = rgb.shape[:2]
    if min(height, width) < min_side:
        raise TinyImageError(path, f"tiny image ({width}x{height}, under {min_side} px a side)")
    return rgb


def resize_image(rgb: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Square (size, size, 3) uint8 with bilinear interpolation, as the reference pipeline did.

    `out`, a C-contiguous (size, size, 3) uint8 array, receives the result in place.
    """
    if rgb.shape[:2] != (size, size):
        return cv2.resize(rgb, (size, size), dst=out, interpolation=cv2.INTER_LINEAR)
    if out is None:
        return np.ascontiguousarray(rgb)
    out[...] = rgb
    return out


def load_image(
    path: str | os.PathLike, size: int, out: np.ndarray | None = None, min_side: int = 0
) -> np.ndarray:
    """decode_image + resize_image: one model-ready uint8 RGB square (into `out` if given)."""
    return resize_image(decode_image(path, min_side), size, out)
