"""Images to uint8 arrays on disk, one set per input size (`make preprocess`).

decode.py turns one file into a model-ready square; workers.py decodes rows into a partial
array on a process pool; partial.py keeps that array resumable; sources.py says what the
arrays are made from; stage.py runs the stage and reads its outputs back.
"""

from dogscats.arrays.stage import MANIFEST, load_split, preprocess, read_manifest
from dogscats.data import BadInputError

__all__ = ["MANIFEST", "BadInputError", "load_split", "preprocess", "read_manifest"]
