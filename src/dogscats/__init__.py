"""Dogs vs. Cats Redux with pretrained backbones: arrays -> GAP features -> heads -> submission.

Importing the package is cheap (no TensorFlow): stages import their heavy dependencies lazily,
so `make` can ask the registry questions without paying for a TensorFlow start-up.
"""

__version__ = "0.1.0"
