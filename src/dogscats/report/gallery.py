"""The galleries: the train images a run gets most wrong, the test images it is least sure of.

Thumbnails come from the uint8 image arrays (arrays.load_split), not from the JPEGs: the model
saw exactly these pixels. The most-wrong train files are also written as a list in the EXCLUDE
file format (one train file name per line, `#` comments), to be reviewed and passed back.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from dogscats import arrays, config, runs, submission

THUMB = 150  # pixels: eight across a 1366-pixel laptop screen, big enough to judge a photo


@dataclass
class Tile:
    id: str
    image: str | None  # JPEG data URI; None when the image is not in the arrays
    caption: list[str]
    flagged: bool = False  # drawn with a red frame: on the wrong side of 0.5, or mislabelled


def most_wrong(run: runs.Run, k: int) -> pd.DataFrame:
    """The k train images with the highest out-of-fold log loss, highest first; `loss` column
    added. Ties keep the run's row order (a stable sort), so the choice is reproducible."""
    oof = run.oof.copy()
    oof["loss"] = submission.image_log_loss(oof["label"], oof["pred"])
    order = np.argsort(-oof["loss"].to_numpy(), kind="stable")[:k]
    return oof.iloc[order].reset_index(drop=True)


def least_certain(run: runs.Run, k: int) -> pd.DataFrame:
    """The k test images whose P(dog) is closest to 0.5, closest first."""
    test = run.test.copy()
    order = np.argsort(np.abs(test["pred"].to_numpy() - 0.5), kind="stable")[:k]
    return test.iloc[order].reset_index(drop=True)


def thumbnail_arrays(data_dir: str | os.PathLike) -> Path | None:
    """The smallest finished arrays folder of the dataset (any size will do for thumbnails)."""
    root = config.arrays_root(data_dir)
    sizes = [] if not root.is_dir() else [p for p in root.iterdir() if p.name.isdigit()]
    finished = [p for p in sizes if (p / arrays.MANIFEST).is_file()]
    return min(finished, key=lambda p: int(p.name)) if finished else None


def _jpeg_uri(rgb: np.ndarray) -> str:
    small = cv2.resize(np.asarray(rgb), (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", small[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError("OpenCV could not encode a thumbnail")
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode()


class Thumbnails:
    """id -> thumbnail of one split of an arrays folder (read through the memory map)."""

    def __init__(self, arrays_dir: Path | None, split: str):
        self.images, self.rows, self.files = None, {}, {}
        if arrays_dir is not None:
            self.images, index = arrays.load_split(arrays_dir, split)
            ids = index["id"].astype(str)
            self.rows = dict(zip(ids, range(len(index))))
            self.files = dict(zip(ids, index["file"]))

    def uri(self, image_id: str) -> str | None:
        row = self.rows.get(str(image_id))
        return None if row is None else _jpeg_uri(self.images[row])

    def file(self, image_id: str) -> str:
        """The file name in the split folder (data.scan_split names train ids `<file>.jpg`)."""
        return self.files.get(str(image_id), f"{image_id}.jpg")


def _animal(label: int) -> str:
    return "dog" if int(label) == config.DOG else "cat"


def train_tiles(wrong: pd.DataFrame, thumbs: Thumbnails) -> list[Tile]:
    return [
        Tile(
            id=row.id,
            image=thumbs.uri(row.id),
            caption=[
                f"labelled {_animal(row.label)}",
                f"P(dog) {row.pred:.3f}",
                f"loss {row.loss:.2f}",
            ],
            flagged=(row.pred > 0.5) != (row.label == config.DOG),
        )
        for row in wrong.itertuples()
    ]


def test_tiles(unsure: pd.DataFrame, thumbs: Thumbnails, truth: dict[str, int]) -> list[Tile]:
    tiles = []
    for row in unsure.itertuples():
        caption = [f"P(dog) {row.pred:.3f}"]
        label = truth.get(str(row.id))
        if label is not None:
            caption.append(f"truly {_animal(label)}")
        wrong = label is not None and (row.pred > 0.5) != (label == config.DOG)
        tiles.append(
            Tile(id=str(row.id), image=thumbs.uri(row.id), caption=caption, flagged=wrong)
        )
    return tiles


def exclude_list(wrong: pd.DataFrame, thumbs: Thumbnails, run_name: str, page: Path) -> str:
    """The most-wrong train files in the EXCLUDE file format, with how to use it."""
    header = [
        f"# The {len(wrong)} train images with the highest out-of-fold log loss of run",
        f"# {run_name}, worst first (make report; see {page.name}, 'Most wrong').",
        "# Delete the lines of images that are labelled right, then pass this file as",
        "# EXCLUDE=<this file> to leave the rest out of training. One train file per line.",
    ]
    return "\n".join(header + [thumbs.file(image_id) for image_id in wrong["id"]]) + "\n"
