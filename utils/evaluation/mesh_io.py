"""Triangle meshes to and from files: Wavefront OBJ, PLY (binary little-endian or ASCII), NoW landmark lists.

Vertices are ``(N, 3)`` float (model frame, millimetres, unless the caller says otherwise), faces ``(F, 3)`` int
0-based in memory (OBJ stores them 1-based), colours ``(N, 3)`` float RGB, clamped to [0, 1] on writing.
Tensors or numpy arrays are accepted; readers return numpy. The readers are minimal (triangles only, the
formats written here): enough to check files and to load them in tests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from utils.errors import DataError

ArrayLike = np.ndarray | torch.Tensor
PLY_VERTEX_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
PLY_COLOUR_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                             ("red", "u1"), ("green", "u1"), ("blue", "u1")])
PLY_FACE_DTYPE = np.dtype([("n", "u1"), ("v", "<i4", (3,))])


def _as_numpy(x: ArrayLike, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check_mesh(vertices: ArrayLike, faces: ArrayLike, colors: ArrayLike | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate and convert to numpy: vertices (N,3) float64, faces (F,3) int64 in [0, N), colours (N,3) or None."""
    v, f = _as_numpy(vertices, np.float64), _as_numpy(faces, np.int64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"mesh vertices must be (N, 3), got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"mesh faces must be (F, 3), got {f.shape}")
    if f.size and (f.min() < 0 or f.max() >= len(v)):
        raise ValueError(f"mesh faces index vertices outside [0, {len(v)})")
    c = None
    if colors is not None:
        c = np.clip(_as_numpy(colors, np.float64), 0.0, 1.0)
        if c.shape != v.shape:
            raise ValueError(f"mesh colours must be (N, 3) = {v.shape}, got {c.shape}")
    return v, f, c


def _colour_bytes(c: np.ndarray) -> np.ndarray:
    """[0, 1] float colours -> uchar 0..255 (rounded)."""
    return np.round(c * 255.0).astype(np.uint8)


def write_obj(path: str | Path, vertices: ArrayLike, faces: ArrayLike, colors: ArrayLike | None = None) -> Path:
    """Write an OBJ: ``v x y z [r g b]`` lines (colours clamped to [0, 1]) then ``f i j k`` 1-based faces."""
    v, f, c = _check_mesh(vertices, faces, colors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = np.hstack([v, c]) if c is not None else v
    fmt = "v %.6f %.6f %.6f %.6f %.6f %.6f" if c is not None else "v %.6f %.6f %.6f"
    with path.open("w") as fh:
        np.savetxt(fh, rows, fmt=fmt)
        np.savetxt(fh, f + 1, fmt="f %d %d %d")
    return path


def write_ply(path: str | Path, vertices: ArrayLike, faces: ArrayLike, colors: ArrayLike | None = None,
              binary: bool = True) -> Path:
    """Write a PLY with float32 vertices, optional uchar colours (clamped [0, 1] x 255), int32 triangle lists."""
    v, f, c = _check_mesh(vertices, faces, colors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", f"element vertex {len(v)}",
              "property float x", "property float y", "property float z"]
    if c is not None:
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header += [f"element face {len(f)}", "property list uchar int vertex_indices", "end_header"]
    with path.open("wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        if binary:
            _write_ply_binary(fh, v, f, c)
        else:
            _write_ply_ascii(fh, v, f, c)
    return path


def _write_ply_binary(fh, v: np.ndarray, f: np.ndarray, c: np.ndarray | None) -> None:
    verts = np.empty(len(v), PLY_COLOUR_DTYPE if c is not None else PLY_VERTEX_DTYPE)
    for k, axis in enumerate("xyz"):
        verts[axis] = v[:, k]
    if c is not None:
        for k, name in enumerate(("red", "green", "blue")):
            verts[name] = _colour_bytes(c[:, k])
    tris = np.empty(len(f), PLY_FACE_DTYPE)
    tris["n"], tris["v"] = 3, f
    fh.write(verts.tobytes())
    fh.write(tris.tobytes())


def _write_ply_ascii(fh, v: np.ndarray, f: np.ndarray, c: np.ndarray | None) -> None:
    lines = [" ".join(f"{x:.6f}" for x in p) for p in v]
    if c is not None:
        lines = [f"{line} {r} {g} {b}" for line, (r, g, b) in zip(lines, _colour_bytes(c))]
    lines += [f"3 {a} {b} {cc}" for a, b, cc in f]
    fh.write(("\n".join(lines) + "\n").encode("ascii"))


def read_obj(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read ``v`` and triangular ``f`` lines (``f a/b/c`` forms accepted) -> vertices (N,3), faces (F,3) 0-based,
    colours (N,3) or None (when the ``v`` lines carry no colour)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"OBJ file not found: {path}")
    verts, faces = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0] not in ("v", "f"):
            continue
        if parts[0] == "v" and len(parts) in (4, 7):
            verts.append([float(x) for x in parts[1:]])
        elif parts[0] == "f" and len(parts) == 4:
            faces.append([int(p.split("/")[0]) - 1 for p in parts[1:]])
        else:
            raise DataError(f"{path}:{number}: unsupported OBJ line {line.strip()!r} (triangles only)")
    if len({len(p) for p in verts}) > 1:
        raise DataError(f"{path}: some vertices have colours and some do not")
    v = np.asarray(verts, dtype=np.float64).reshape(-1, len(verts[0]) if verts else 3)
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    return v[:, :3], f, (v[:, 3:] if v.shape[1] == 6 else None)


def _read_ply_header(fh, path: Path) -> tuple[str, int, int, bool]:
    """(format, n_vertices, n_faces, has_colour) from a PLY header written by `write_ply`."""
    if fh.readline().strip() != b"ply":
        raise DataError(f"{path} is not a PLY file")
    fmt, counts, colour = "", {}, False
    for raw in iter(fh.readline, b""):
        words = raw.decode("ascii", "replace").split()
        if words[:1] == ["end_header"]:
            return fmt, counts.get("vertex", 0), counts.get("face", 0), colour
        if words[:1] == ["format"]:
            fmt = words[1]
        elif words[:1] == ["element"]:
            counts[words[1]] = int(words[2])
        elif words[:2] == ["property", "uchar"] and words[2] in ("red", "r"):
            colour = True
    raise DataError(f"{path}: PLY header has no end_header")


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read a PLY written by `write_ply` (binary little-endian or ASCII) -> vertices (N,3), faces (F,3),
    colours (N,3) in [0, 1] or None."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"PLY file not found: {path}")
    with path.open("rb") as fh:
        fmt, nv, nf, colour = _read_ply_header(fh, path)
        if fmt == "binary_little_endian":
            vdtype = PLY_COLOUR_DTYPE if colour else PLY_VERTEX_DTYPE
            verts = np.frombuffer(fh.read(nv * vdtype.itemsize), vdtype)
            tris = np.frombuffer(fh.read(nf * PLY_FACE_DTYPE.itemsize), PLY_FACE_DTYPE)
            v = np.stack([verts[a] for a in "xyz"], 1).astype(np.float64)
            c = np.stack([verts[n] for n in ("red", "green", "blue")], 1) / 255.0 if colour else None
            return v, tris["v"].astype(np.int64), c
        if fmt != "ascii":
            raise DataError(f"{path}: unsupported PLY format {fmt!r}")
        rows = fh.read().decode("ascii").split("\n")
    vrows = np.asarray([r.split() for r in rows[:nv]], dtype=np.float64).reshape(nv, 6 if colour else 3)
    f = np.asarray([r.split()[1:4] for r in rows[nv:nv + nf]], dtype=np.int64).reshape(nf, 3)
    return vrows[:, :3], f, (vrows[:, 3:] / 255.0 if colour else None)


def write_now_landmarks(path: str | Path, points: ArrayLike) -> Path:
    """Write the 7 NoW-challenge landmarks ``(7, 3)`` (mesh frame, mm) as one ``x y z`` line each."""
    p = _as_numpy(points, np.float64)
    if p.shape != (7, 3):
        raise ValueError(f"NoW landmarks must be (7, 3), got {p.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, p, fmt="%.6f")
    return path
