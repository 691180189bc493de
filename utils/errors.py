"""Project exception hierarchy.

Library code raises these with a message that names the offending file or flag and says what to do;
command-line entry points catch `MofaError` in `main()` and print that one line to stderr (exit code 2).
"""


class MofaError(Exception):
    """Base class of every error the project raises on purpose (bad input, missing file, bad option)."""


class DataError(MofaError):
    """Bad or missing input data: image root, CSV, image or mask file."""
