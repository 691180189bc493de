"""Errors of the data and training layers. The base class `MofaError` lives in `models.errors` (the lowest layer);
command-line entry points catch it and print its message as one line (exit code 2).
"""
from models.errors import MofaError, message_of

__all__ = ["DataError", "MofaError", "message_of"]


class DataError(MofaError):
    """Bad or missing input data: image root, CSV, image or mask file."""
