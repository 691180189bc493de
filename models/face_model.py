"""The Basel Face Model 2017 as an `nn.Module` with buffers (shape, expression and albedo PCA models).

Model frame: millimetres, x right, y up, z toward the viewer. After loading, the mean shape is recentred by
(0, 0, -100) mm so the origin sits near the face surface (as in the original `adjust_center`).
Bases are stored as `(3N, K)` with rows in vertex-interleaved order (x0, y0, z0, x1, ...), each column scaled by
sqrt(variance), so coefficients are in units of standard deviations.

The bases are registered as non-persistent buffers: checkpoints never contain the (licensed) face model; they
store `FaceModel.config()` instead, which identifies the model the checkpoint was made with.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.errors import FaceModelError
from models.landmarks68 import N_LANDMARKS
from models.layout import CoeffLayout

# The G1 landmark list shipped beside this package (models/ never imports utils.cli, where the repository root lives).
DEFAULT_LANDMARKS_PATH = Path(__file__).resolve().parents[1] / "basel_3DMM" / "ibug68_landmarks.txt"
LANDMARK_KEY = "metadata/landmarks/ibug68_vertex_indices"
RECENTRE_MM = (0.0, 0.0, 100.0)
BFM_URL = "https://faces.dmi.unibas.ch/bfm/bfm2017.html"
DEMO_HINT = ("`python -m utils.synthetic.demo_face_model --out basel_3DMM/demo_face_model.h5` and "
             "`--bfm basel_3DMM/demo_face_model.h5` use the procedural demo model instead")

# h5 group of each PCA model and the CoeffLayout field giving the number of components kept.
PCA_GROUPS = {"shape": ("shape/model", "n_shape"), "exp": ("expression/model", "n_exp"),
              "tex": ("color/model", "n_tex")}


@dataclass(frozen=True)
class AtLeast:
    """A shape entry meaning 'this many or more' (for PCA component counts)."""

    value: int

    def __str__(self) -> str:
        return f">={self.value}"


def _shape_ok(found: tuple[int, ...], expected: tuple[int | AtLeast | None, ...]) -> bool:
    if len(found) != len(expected):
        return False
    for size, want in zip(found, expected):
        if isinstance(want, AtLeast) and size < want.value:
            return False
        if isinstance(want, int) and size != want:
            return False
    return True


def _read(h5, key: str, expected: tuple[int | AtLeast | None, ...], path: Path) -> np.ndarray:
    """Read dataset `key`, checking its shape; `None` in `expected` matches any size."""
    entries = ["any" if e is None else str(e) for e in expected]
    shown = f"({entries[0]},)" if len(entries) == 1 else "(" + ", ".join(entries) + ")"
    if key not in h5:
        raise FaceModelError(f"{path}: key '{key}' is missing (expected a dataset of shape {shown}); "
                             f"is this a BFM2017 h5 file?")
    found = tuple(h5[key].shape)
    if not _shape_ok(found, expected):
        raise FaceModelError(f"{path}: key '{key}' has shape {found}, expected {shown}")
    return np.asarray(h5[key][()])


def analytic_crop_mask(points: np.ndarray, scale: float = 1.0, c4_min: float = 20.0) -> np.ndarray:
    """G1 analytic face crop on the original (not recentred) BFM mean.

    Args:
        points: `(N, 3)` model-frame vertices in mm (BFM origin, before the (0, 0, 100) recentring).
        scale, c4_min: 1 and 20 are G1's crop (what the loader uses); ``scale < 1`` shrinks the three cones and
            ``c4_min > 20`` moves the back plane ``z + 0.05 y > c4_min`` forward (margins, e.g. for picking
            landmark vertices well inside the crop).
    Returns:
        `(N,)` bool, True for vertices inside the crop region (before the used-by-a-kept-triangle rule).
    """
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        xz2, yz, y18z, y25z = (x / z) ** 2, y / z, (y + 18.0) / z, (y - 25.0) / z
        c1 = xz2 / (100.0 * scale) ** 2 + yz**2 / (0.75 * scale) ** 2 <= 1.0
        c2 = xz2 / (100.0 * scale) ** 2 + y18z**2 / (0.62 * scale) ** 2 <= 1.0
        c3 = xz2 / (3.2 * scale) ** 2 + y25z**2 / (0.92 * scale) ** 2 <= 1.0
    c4 = z + 0.05 * y > c4_min
    return (c1 | c2 | c3) & c4


def crop_mesh(keep_vertex: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep triangles whose three vertices are kept, then the vertices used by a kept triangle.

    Args:
        keep_vertex: `(N,)` bool candidate vertices.
        faces: `(F, 3)` int vertex indices into the full mesh.
    Returns:
        kept_vertices `(N',)` int64 original ids (ascending), new faces `(F', 3)` int64 into the cropped mesh,
        old_to_new `(N,)` int64 (-1 for removed vertices).
    """
    kept_faces = faces[keep_vertex[faces].all(axis=1)]
    used = np.zeros(len(keep_vertex), dtype=bool)
    used[kept_faces.ravel()] = True
    kept_vertices = np.flatnonzero(used).astype(np.int64)
    old_to_new = np.full(len(keep_vertex), -1, dtype=np.int64)
    old_to_new[kept_vertices] = np.arange(len(kept_vertices), dtype=np.int64)
    return kept_vertices, old_to_new[kept_faces], old_to_new


def read_landmark_file(path: Path) -> np.ndarray:
    """Read 68 vertex indices, one per line; blank lines and lines starting with '#' are ignored."""
    if not path.is_file():
        raise FaceModelError(f"landmark file not found: {path} (expected {N_LANDMARKS} vertex indices, one per line)")
    values = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            values.append(int(text))
        except ValueError:
            raise FaceModelError(f"{path}:{number}: expected one integer vertex index, got {text!r}") from None
    if len(values) != N_LANDMARKS:
        raise FaceModelError(f"{path}: expected exactly {N_LANDMARKS} landmark indices, found {len(values)}")
    return np.asarray(values, dtype=np.int64)


def _load_landmarks(h5, path: Path, landmarks_path: Path | None, n_vertices: int) -> np.ndarray:
    """Full-mesh landmark ids: explicit file > h5 key `LANDMARK_KEY` > `DEFAULT_LANDMARKS_PATH`."""
    if landmarks_path is not None:
        source, idx = str(landmarks_path), read_landmark_file(Path(landmarks_path))
    elif LANDMARK_KEY in h5:
        source, idx = f"{path}:{LANDMARK_KEY}", _read(h5, LANDMARK_KEY, (N_LANDMARKS,), path).astype(np.int64)
    else:
        source, idx = str(DEFAULT_LANDMARKS_PATH), read_landmark_file(DEFAULT_LANDMARKS_PATH)
    bad = np.flatnonzero((idx < 0) | (idx >= n_vertices))
    if bad.size:
        raise FaceModelError(f"{source}: landmark {bad[0]} has vertex index {idx[bad[0]]}, outside the mesh "
                             f"of {n_vertices} vertices in {path}")
    return idx


def _read_pca(h5, group: str, n_keep: int, field: str, n_rows: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Mean `(3N,)` and scaled basis `(3N, n_keep)` (float64) of one PCA model."""
    mean = _read(h5, f"{group}/mean", (n_rows,), path).astype(np.float64)
    variance = _read(h5, f"{group}/pcaVariance", (None,), path).astype(np.float64)
    n_file = variance.shape[0]
    if n_file < n_keep:
        raise FaceModelError(f"{path}: '{group}' has {n_file} components but the layout asks for {n_keep} "
                             f"(CoeffLayout.{field}); use a smaller layout or another model file")
    basis = _read(h5, f"{group}/pcaBasis", (n_rows, n_file), path)[:, :n_keep].astype(np.float64)
    for key, values in (("mean", mean), ("pcaVariance", variance[:n_keep]), ("pcaBasis", basis)):
        if not np.isfinite(values).all():
            raise FaceModelError(f"{path}: '{group}/{key}' holds NaN or infinite values: the file is damaged; "
                                 "download or write it again")
    if (variance[:n_keep] < 0).any():
        raise FaceModelError(f"{path}: '{group}/pcaVariance' has negative entries")
    return mean, basis * np.sqrt(variance[:n_keep])[None, :]


def _vertex_rows(vertex_ids: np.ndarray) -> np.ndarray:
    """Rows of an interleaved `(3N, K)` basis belonging to `vertex_ids`."""
    return (vertex_ids[:, None] * 3 + np.arange(3)[None, :]).ravel()


def _open_h5(path: Path):
    import h5py

    if not path.is_file():
        raise FaceModelError(f"face model file not found: {path}. BFM2017 (model2017-1_bfm_nomouth.h5) is "
                             f"requested at {BFM_URL} and placed there; {DEMO_HINT}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise FaceModelError(f"{path}: cannot be read as an HDF5 face model ({err})") from None


def _read_mesh(h5, path: Path) -> tuple[int, np.ndarray]:
    """Vertex count N and faces `(F, 3)` int64 of the full mesh."""
    n_vertices = _read(h5, "shape/representer/points", (3, None), path).shape[1]
    cells = _read(h5, "shape/representer/cells", (3, None), path)
    if not np.issubdtype(cells.dtype, np.integer):
        raise FaceModelError(f"{path}: key 'shape/representer/cells' has dtype {cells.dtype}, expected integers")
    faces = cells.T.astype(np.int64)
    if faces.size and (faces.min() < 0 or faces.max() >= n_vertices):
        raise FaceModelError(f"{path}: key 'shape/representer/cells' indexes vertices outside [0, {n_vertices})")
    return n_vertices, faces


class FaceModel(nn.Module):
    """Linear face model: `vertices = mean_shape + shape_basis @ shape + exp_basis @ exp`, likewise albedo.

    Buffers (float32 unless noted): `mean_shape (N, 3)` model frame mm (recentred), `geometry_basis
    (3N, n_shape + n_exp)` = `[shape_basis | exp_basis]` (one product gives the vertices; `shape_basis` and
    `exp_basis` are its column views), `mean_albedo (N, 3)` RGB ~[0, 1], `tex_basis (3N, n_tex)`, `faces (F, 3)`
    long (counter-clockwise seen from outside), `landmark_idx (68,)` long into this mesh, `kept_vertices (N,)`
    long: the original (full-mesh) vertex id of every vertex, for exporting meshes.
    """

    def __init__(self, mean_shape: torch.Tensor, shape_basis: torch.Tensor, exp_basis: torch.Tensor,
                 mean_albedo: torch.Tensor, tex_basis: torch.Tensor, faces: torch.Tensor,
                 landmark_idx: torch.Tensor, kept_vertices: torch.Tensor | None = None) -> None:
        super().__init__()
        n = mean_shape.shape[0]
        _check(mean_shape, (n, 3), "mean_shape")
        _check(mean_albedo, (n, 3), "mean_albedo")
        for name, basis in (("shape_basis", shape_basis), ("exp_basis", exp_basis), ("tex_basis", tex_basis)):
            _check(basis, (3 * n, basis.shape[-1]), name)
        _check(faces, (faces.shape[0], 3), "faces")
        _check(landmark_idx, (N_LANDMARKS,), "landmark_idx")
        kept = torch.arange(n) if kept_vertices is None else kept_vertices
        _check(kept, (n,), "kept_vertices")
        self.n_shape = shape_basis.shape[1]
        geometry = torch.cat([shape_basis.to(torch.float32), exp_basis.to(torch.float32)], dim=1)
        for name, value in (("mean_shape", mean_shape), ("geometry_basis", geometry),
                            ("mean_albedo", mean_albedo), ("tex_basis", tex_basis)):
            self.register_buffer(name, value.to(torch.float32).contiguous(), persistent=False)
        for name, value in (("faces", faces), ("landmark_idx", landmark_idx), ("kept_vertices", kept)):
            self.register_buffer(name, value.to(torch.long).contiguous(), persistent=False)

    @classmethod
    def from_h5(cls, path: str | Path, layout: CoeffLayout = CoeffLayout(), crop: bool = True,
                landmarks_path: str | Path | None = None) -> FaceModel:
        """Load a BFM2017-layout h5 file, keep the first `layout` components, crop (G1) and recentre.

        Raises `FaceModelError` naming the file / key / shape when the file is missing or malformed.
        """
        path = Path(path)
        with _open_h5(path) as h5:
            n_full, faces = _read_mesh(h5, path)
            pcas = {name: _read_pca(h5, group, getattr(layout, field), field, 3 * n_full, path)
                    for name, (group, field) in PCA_GROUPS.items()}
            landmarks = _load_landmarks(h5, path, None if landmarks_path is None else Path(landmarks_path), n_full)
        mean_shape = (pcas["shape"][0] + pcas["exp"][0]).reshape(n_full, 3)
        kept = np.arange(n_full, dtype=np.int64)
        if crop:
            kept, faces, old_to_new = crop_mesh(analytic_crop_mask(mean_shape), faces)
            landmarks = _remap_landmarks(landmarks, old_to_new, path)
        rows = _vertex_rows(kept)
        t = torch.from_numpy
        return cls(mean_shape=t(mean_shape[kept] - np.asarray(RECENTRE_MM)),
                   shape_basis=t(pcas["shape"][1][rows]), exp_basis=t(pcas["exp"][1][rows]),
                   mean_albedo=t(pcas["tex"][0].reshape(n_full, 3)[kept]), tex_basis=t(pcas["tex"][1][rows]),
                   faces=t(faces), landmark_idx=t(landmarks), kept_vertices=t(kept))

    @property
    def n_vertices(self) -> int:
        return self.mean_shape.shape[0]

    @property
    def n_faces(self) -> int:
        return self.faces.shape[0]

    @property
    def shape_basis(self) -> torch.Tensor:
        """`(3N, n_shape)` identity basis (a view of `geometry_basis`)."""
        return self.geometry_basis[:, :self.n_shape]

    @property
    def exp_basis(self) -> torch.Tensor:
        """`(3N, n_exp)` expression basis (a view of `geometry_basis`)."""
        return self.geometry_basis[:, self.n_shape:]

    @property
    def layout(self) -> CoeffLayout:
        """The coefficient layout matching this model's basis sizes."""
        return CoeffLayout(self.shape_basis.shape[1], self.exp_basis.shape[1], self.tex_basis.shape[1])

    def vertices(self, shape: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
        """Model-frame vertices `(B, N, 3)` in mm from shape `(B, n_shape)` and expression `(B, n_exp)` coeffs."""
        _check_coeffs(shape, self.shape_basis, "shape")
        _check_coeffs(exp, self.exp_basis, "exp")
        if shape.shape[0] != exp.shape[0]:
            raise ValueError(f"shape and exp batch sizes differ: {shape.shape[0]} vs {exp.shape[0]}")
        coeffs = torch.cat([shape, exp], dim=1)  # one product with [shape_basis | exp_basis], the mean added in
        flat = torch.addmm(self.mean_shape.view(1, -1), coeffs, self.geometry_basis.t())  # (B, 3N)
        return flat.view(shape.shape[0], self.n_vertices, 3)

    def albedo(self, tex: torch.Tensor) -> torch.Tensor:
        """Per-vertex albedo `(B, N, 3)` RGB (roughly [0, 1], not clamped) from texture coeffs `(B, n_tex)`."""
        _check_coeffs(tex, self.tex_basis, "tex")
        flat = torch.addmm(self.mean_albedo.view(1, -1), tex, self.tex_basis.t())  # (B, 3N)
        return flat.view(tex.shape[0], self.n_vertices, 3)

    def config(self) -> dict:
        """Path-independent identity of this model, stored in checkpoints to detect a different face model: the
        sizes and one checksum over every buffer (means, bases, triangles, landmarks, kept vertices), in float32 /
        int64 whatever device or dtype the model was moved to."""
        digest = hashlib.sha256()
        for name, buffer in self.named_buffers():
            dtype = torch.float32 if buffer.is_floating_point() else torch.int64
            digest.update(name.encode())
            digest.update(buffer.detach().to("cpu", dtype).contiguous().numpy().tobytes())
        return {"n_vertices": self.n_vertices, "n_faces": self.n_faces, "n_shape": self.layout.n_shape,
                "n_exp": self.layout.n_exp, "n_tex": self.layout.n_tex, "sha256": digest.hexdigest()[:16]}


def _remap_landmarks(landmarks: np.ndarray, old_to_new: np.ndarray, path: Path) -> np.ndarray:
    new = old_to_new[landmarks]
    outside = np.flatnonzero(new < 0)
    if outside.size:
        j = int(outside[0])
        raise FaceModelError(f"{path}: landmark {j} (0-based, vertex {landmarks[j]}) lies outside the face crop; "
                             f"fix the landmark list or load with crop=False")
    return new


def _check(tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"FaceModel: {name} must have shape {shape}, got {tuple(tensor.shape)}")


def _check_coeffs(coeffs: torch.Tensor, basis: torch.Tensor, name: str) -> None:
    if coeffs.ndim != 2 or coeffs.shape[1] != basis.shape[1]:
        raise ValueError(f"{name} coefficients must be (B, {basis.shape[1]}), got {tuple(coeffs.shape)}")
