"""Images to uint8 arrays on disk, one set per input size (`make preprocess`).

decode.py turns one file into a model-ready square; workers.py decodes rows into a partial
array on a process pool; partial.py keeps that array resumable; sources.py says what the
arrays are made from; rows.py gives each row a digest; stage.py runs the stage and reads its
outputs back (RowCheck: rows as read against their digests).
"""

from dogscats.arrays.stage import (
    MANIFEST,
    RowCheck,
    load_split,
    preprocess,
    read_manifest,
    row_check,
)
from dogscats.data import BadInputError

__all__ = [
    "MANIFEST",
    "BadInputError",
    "RowCheck",
    "load_split",
    "preprocess",
    "read_manifest",
    "row_check",
]
