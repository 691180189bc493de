"""Read and write the landmark CSV files of an image root.

Format (compatible with the original code): one row per image, no header,
``filename, x0, y0, x1, y1, ..., x67, y67``: the filename (relative to ``IMAGE_ROOT/Dataset/``) and
136 numbers, the 68 iBUG/300-W points interleaved x then y. Coordinates are pixels of the image file,
origin top-left, x right, y down, pixel centres at integer coordinates. Integers and floats are both
accepted (the original parsed with ``int()`` and crashed on floats). Blank lines are skipped.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from collections.abc import Iterable, Sequence

import numpy as np

from models.landmarks68 import N_LANDMARKS
from utils.data.image_root import unsafe_image_name
from utils.errors import DataError

N_FIELDS = 1 + 2 * N_LANDMARKS
MAX_COORDINATE = 1e6  # pixels; beyond any image (and far below float32's 3.4e38, where 1e39 becomes inf)

LandmarkRow = tuple[str, np.ndarray]


class LandmarkCSVError(DataError):
    """A landmark CSV is missing, empty or malformed; the message names the file and the 1-based line."""


def _parse_number(text: str, column: int, where: str) -> float:
    """Parse one coordinate field; `column` is the 0-based field index (1 = x0)."""
    point, axis = divmod(column - 1, 2)
    label = f"{'xy'[axis]}{point}"
    try:
        value = float(text)
    except ValueError:
        hint = " (the CSV must not have a header row)" if where.endswith("line 1") else ""
        raise LandmarkCSVError(f"{where}: field {column + 1} ({label}) is not a number: {text!r}{hint}") from None
    if not math.isfinite(value):
        raise LandmarkCSVError(f"{where}: field {column + 1} ({label}) is not finite: {text!r}")
    if abs(value) > MAX_COORDINATE:
        raise LandmarkCSVError(f"{where}: field {column + 1} ({label}) = {text!r} is not a pixel coordinate "
                               f"(|value| > {MAX_COORDINATE:g})")
    return value


def _parse_row(fields: Sequence[str], where: str) -> LandmarkRow:
    """Turn one CSV row into (filename, (68, 2) float32 array) or raise `LandmarkCSVError`."""
    if len(fields) != N_FIELDS:
        raise LandmarkCSVError(
            f"{where}: expected {N_FIELDS} fields (filename + {N_FIELDS - 1} numbers), found {len(fields)}"
        )
    filename = fields[0]  # as written: a name may start or end with spaces (see `_check_images`)
    if not filename.strip():
        raise LandmarkCSVError(f"{where}: empty filename in field 1")
    values = [_parse_number(text.strip(), column, where) for column, text in enumerate(fields[1:], start=1)]
    return filename, np.asarray(values, dtype=np.float32).reshape(N_LANDMARKS, 2)


def _check_images(rows: list[tuple[int, LandmarkRow]], path: Path, image_dir: Path) -> list[tuple[int, LandmarkRow]]:
    """The rows with each filename as it names a file: as written, else without surrounding spaces (``a.png, 1, 2``
    style); one error listing (up to 5 of) the rows whose name is absolute or leaves the image folder, else those
    whose image file does not exist (names quoted as written, spaces visible)."""
    unsafe = [(line, name, why) for line, (name, _) in rows if (why := unsafe_image_name(name))]
    if unsafe:
        line, name, why = unsafe[0]
        more = f" (and {len(unsafe) - 1} more)" if len(unsafe) > 1 else ""
        raise LandmarkCSVError(f"{path} line {line}: image name {name!r} {why}{more}; filenames must be relative to "
                               "IMAGE_ROOT/Dataset/ and stay inside it")
    found, missing = [], []
    for line, (name, points) in rows:
        if not (image_dir / name).is_file() and name.strip() != name and (image_dir / name.strip()).is_file():
            name = name.strip()
        (found if (image_dir / name).is_file() else missing).append((line, (name, points)))
    if not missing:
        return found
    shown = "; ".join(f"line {line}: {name!r}" for line, (name, _) in missing[:5])
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise LandmarkCSVError(
        f"{path}: {len(missing)} image file(s) not found in {image_dir}: {shown}{more}; "
        "filenames must be relative to IMAGE_ROOT/Dataset/"
    )


def read_landmarks_csv(
    path: str | Path, image_dir: str | Path | None = None, allow_empty: bool = False
) -> list[LandmarkRow]:
    """Read a landmark CSV.

    Args:
        path: the CSV file.
        image_dir: when given, every filename must name an existing file under this folder.
        allow_empty: return ``[]`` for a CSV without rows instead of raising.
    Returns:
        ``[(filename, landmarks)]`` in file order; landmarks is a ``(68, 2)`` float32 array of pixel
        coordinates (x right, y down) in the frame of the image file.
    Raises:
        LandmarkCSVError: the file is missing, has no rows, or a row is malformed (the message names
        the file, the 1-based line number and the problem).
    """
    path = Path(path)
    if not path.is_file():
        raise LandmarkCSVError(f"landmark CSV not found: {path}")
    rows: list[tuple[int, LandmarkRow]] = []
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:  # the line of the first bad byte, not the line the CSV reader had reached
        line = data[:err.start].count(b"\n") + 1
        raise LandmarkCSVError(f"{path} line {line}: not UTF-8 text (byte {data[err.start:err.start + 1]!r}); save "
                               "the CSV as UTF-8") from None
    except OSError as err:
        raise LandmarkCSVError(f"cannot read {path}: {err.strerror or err}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for fields in reader:
            if all(not field.strip() for field in fields):
                continue
            rows.append((reader.line_num, _parse_row(fields, f"{path} line {reader.line_num}")))
    except csv.Error as err:
        raise LandmarkCSVError(f"{path} line {reader.line_num + 1}: cannot parse CSV: {err}") from None
    if not rows and not allow_empty:
        raise LandmarkCSVError(f"{path}: no rows (expected one line per image: filename, x0, y0, ..., x67, y67)")
    if image_dir is not None:
        rows = _check_images(rows, path, Path(image_dir))
    return [row for _, row in rows]


def write_landmarks_csv(path: str | Path, rows: Iterable[tuple[str, np.ndarray]]) -> None:
    """Write ``[(filename, (68, 2) array)]`` in the format `read_landmarks_csv` reads (3 decimals).

    The parent folder is created if needed.
    """
    path = Path(path)
    lines = []
    for filename, landmarks in rows:
        points = np.asarray(landmarks, dtype=np.float64)
        if points.shape != (N_LANDMARKS, 2) or not np.isfinite(points).all():
            raise DataError(f"{path}: landmarks of {filename!r} must be a finite (68, 2) array, got {points.shape}")
        if not filename or "\n" in filename:
            raise DataError(f"{path}: invalid filename {filename!r}")
        lines.append([filename] + [f"{value:.3f}" for value in points.reshape(-1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows(lines)
