"""The cache of feature maps at the cut (augment="flip").

The frozen bottom runs once per image and once per mirrored image; each epoch then feeds every
image's plain or mirrored map to the trainable top. One folder per backbone, cut, weights,
input size, image arrays and dtype, holding {split}.npy of shape (N, 2 views, h, w, c).
Each split is filled through features.run_forward under its partial name, and resumes.

A cache at a lower cut (more blocks fine-tuned) serves every cut above it: the maps at the
higher cut are derived from it by running only the frozen blocks between the two cuts over
its maps, plain and mirrored, instead of the whole bottom over the images.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from dogscats import arrays, litert, store
from dogscats.backbones import BackboneSpec
from dogscats.finetune.hparams import Log
from dogscats.finetune.model import Cut, block_end
from dogscats.forward import Forward, place, run_forward

CACHE_FORMAT = 1  # bump when the cache layout changes
CACHE_SOURCE = "source.json"  # in each cache folder: the arrays it was made from


def cache_folder(root: Path, backbone: str, cut: str, settings: dict) -> Path:
    """One folder per backbone, cut, weights, input size, image arrays and dtype."""
    key = store.digest(
        CACHE_FORMAT,
        backbone,
        cut,
        settings["weights"],
        settings["input_size"],
        settings["fingerprint"],
        settings["cache_dtype"],
    )
    return Path(root) / f"{backbone}__{cut}__{key[:12]}"


@dataclass(frozen=True)
class LowerCache:
    """A complete cache at a cut below the one wanted, from which that one is derived."""

    folder: Path
    cut: str  # its registry name (BackboneSpec.blocks)


def lower_cache(
    root: Path, spec: BackboneSpec, blocks: int, settings: dict, arrays_dir: Path
) -> LowerCache | None:
    """The complete cache nearest below the cut of `blocks` (same backbone, weights, input
    size, arrays and dtype), or None. The nearest: the fewest frozen blocks to run."""
    counts = arrays.read_manifest(arrays_dir)["counts"]
    for deeper in range(blocks + 1, len(spec.blocks)):
        cut = spec.blocks[-deeper - 1]
        folder = cache_folder(root, spec.name, cut, settings)
        if all(_whole(folder / f"{split}.npy", counts[split]) for split in store.SPLITS):
            return LowerCache(folder, cut)
    return None


def build_cache(
    folder: Path,
    cut: Cut,
    spec: BackboneSpec,
    arrays_dir: Path,
    batch_size: int,
    dtype: str,
    progress: bool,
    log: Log,
    runtime: str = "keras",
    workers: int | None = None,
    lower: LowerCache | None = None,
) -> dict[str, np.ndarray]:
    """Maps at the cut of every image, plain and mirrored: {split: (N, 2, h, w, c) memmap}.
    `runtime`: what runs the bottom (litert.forward; on LiteRT it is exported as its own
    model, so the maps match Keras's within litert.MATCH_TOLERANCE). `lower`: a cache below
    this cut (lower_cache) that the maps are derived from, with Keras."""
    source = {
        "arrays": str(Path(arrays_dir).resolve()),
        "fingerprint": arrays.read_manifest(arrays_dir)["fingerprint"],
    }
    drop_stale_caches(folder.parent, source, log)
    folder.mkdir(parents=True, exist_ok=True)
    store.write_json(folder / CACHE_SOURCE, source)
    forward = between = None
    maps = {}
    for split in store.SPLITS:
        path = folder / f"{split}.npy"
        rows = arrays.read_manifest(arrays_dir)["counts"][split]
        if path.is_file() and not _whole(path, rows):
            log(f"{path} is damaged (cut short or unreadable): set aside, rebuilding it")
            store.set_aside(path)
        if not path.is_file() and lower is not None:
            between = between or _Between(cut, spec, lower.cut)
            lower_maps = np.load(lower.folder / f"{split}.npy", mmap_mode="r")
            log(
                f"Deriving {split} maps at {cut.layer} in {path} from the cache at "
                f"{between.lower_layer} ({lower.folder.name}): only the blocks between run"
            )
            route = lower.folder.name
            _fill_split(path, lower_maps, None, between, batch_size, dtype, progress, route)
        if not path.is_file():
            images, index = arrays.load_split(arrays_dir, split)
            check = arrays.row_check(arrays_dir, split, index)  # rows against their digests
            if forward is None:  # the bottom runs at the arrays' size, whatever the registry's
                sized = dataclasses.replace(spec, input_size=int(images.shape[1]))
                forward = litert.forward(
                    cut.bottom,
                    sized,
                    batch_size,
                    True,
                    place("1"),
                    runtime,
                    workers=workers,
                    name=f"{spec.name}@cut-{cut.layer}",
                    log=log,
                )
                log(f"Cut cache forward pass: {forward.placement.describe()}")
            log(f"Caching {split} maps at {cut.layer} in {path}")
            _fill_split(path, images, check, forward, batch_size, dtype, progress, "images")
        maps[split] = np.load(path, mmap_mode="r")
    return maps


class _Between:
    """The frozen layers between a lower cut and `cut`, over a batch of cached maps
    (batch, 2 views, h, w, c): the forward that run_forward drives in place of the bottom.
    Keras's predict_on_batch is enough here: these few blocks cost little next to the bottom
    over the images, so the compiled loop of forward.Forward is not needed."""

    def __init__(self, cut: Cut, spec: BackboneSpec, lower: str):
        start = block_end(cut.bottom, lower)
        self.lower_layer = start.name
        self.model = keras.Model(start.output, cut.bottom.output, name=f"{spec.name}_between")
        self.output_shape = tuple(self.model.output_shape[1:])

    def put(self, batch: np.ndarray) -> np.ndarray:
        return batch

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        views = np.asarray(batch, np.float32).reshape(-1, *batch.shape[2:])
        maps = self.model.predict_on_batch(views)
        maps = np.asarray(maps).reshape(len(batch), batch.shape[1], *self.output_shape)
        return [maps[:, 0], maps[:, 1]]

    fetch = staticmethod(Forward.fetch)


def _whole(path: Path, rows: int) -> bool:
    """A finished cache file that reads whole and holds every row."""
    try:
        return np.load(path, mmap_mode="r").shape[0] == rows
    except (OSError, ValueError):
        return False


def drop_stale_caches(root: Path, source: dict, log: Log) -> None:
    """Remove caches made from an earlier version of the arrays in `source`: they can never be
    used again, and on the full data set each one takes several GB."""
    for stamp in root.glob(f"*/{CACHE_SOURCE}"):
        made_from = store.read_json(stamp)
        if made_from is None:
            continue
        same_arrays = made_from.get("arrays") == source["arrays"]
        if same_arrays and made_from.get("fingerprint") != source["fingerprint"]:
            log(f"Removing {stamp.parent}: made from an earlier version of {source['arrays']}")
            shutil.rmtree(stamp.parent)


def _fill_split(
    path: Path,
    images,
    check,
    forward,
    batch_size: int,
    dtype: str,
    progress: bool,
    route: str,
) -> None:
    """Write one split under its partial name, batch by batch; rename when complete.
    `check` (arrays.RowCheck) sees every batch of images as read. `route`: where the maps come
    from ("images", or the lower cache's folder name).

    The rows done are recorded after each flushed batch, so an interrupted run continues, by
    the same route only: the two routes agree within float32 rounding, not bit for bit, and a
    cache is one route's output.
    """
    partial = store.partial_path(path)
    state = partial.with_suffix(".json")  # the resume point: {"rows_done": n, "from": route}
    map_shape = forward.output_shape
    shape = (len(images), 2, *map_shape)
    done = _rows_done(partial, state, shape, dtype, route)
    if not done:  # forget the old resume point before the file it describes is wiped
        store.remove(state)
    mode = "r+" if done else "w+"
    maps = np.lib.format.open_memmap(partial, mode=mode, dtype=dtype, shape=shape)
    write = _row_writer(maps, state, route)
    run_forward(images, forward, batch_size, write, done, path.stem, progress, check=check)
    store.move_into_place(partial, path)
    store.remove(state)


def _row_writer(maps, state: Path, route: str):
    """The write callback of run_forward: a batch of plain and mirrored maps into `maps`,
    then its end recorded in `state`."""

    def write(first: int, outputs: list[np.ndarray]) -> None:
        plain, mirrored = outputs
        maps[first : first + len(plain), 0] = plain
        maps[first : first + len(plain), 1] = mirrored
        maps.flush()  # the rows first, then the count that says they are there
        store.write_json(state, {"rows_done": first + len(plain), "from": route})

    return write


def _rows_done(partial: Path, state: Path, shape: tuple, dtype: str, route: str) -> int:
    """Rows already in a partial cache file of the same shape, dtype and route, else 0 (start
    afresh)."""
    recorded = store.read_json(state)
    if recorded is None or recorded.get("from") != route:
        return 0
    try:
        existing = np.load(partial, mmap_mode="r")
    except (OSError, ValueError):
        return 0
    if existing.shape != shape or existing.dtype != np.dtype(dtype):
        return 0
    return int(recorded.get("rows_done", 0))
