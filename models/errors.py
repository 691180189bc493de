"""Exceptions raised by `models/` for bad user input (missing files, wrong shapes).

Each message names the offending file / key / argument and what to do. They derive from the project base
`utils.errors.MofaError` (which CLIs catch in `main()` and print as one line) and from `ValueError`.
"""
from __future__ import annotations

from utils.errors import MofaError


class ModelInputError(MofaError, ValueError):
    """Base class for user-facing errors raised while building models from files or arguments."""


class FaceModelError(ModelInputError):
    """The face model file (BFM2017 layout) or its landmark list is missing or malformed."""


class WeightsError(ModelInputError):
    """A pretrained-weights file is missing or does not match the network."""
