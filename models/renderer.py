"""Differentiable face renderer: coefficients -> shaded mesh -> image, mask and 2-D landmarks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.camera import CameraConfig, euler_rotation, project, to_camera
from models.face_model import FaceModel
from models.layout import CoeffLayout, light_with_offset
from models.rasterizer import Fragments, interpolate, rasterize
from models.shading import MeshTopology, mesh_topology, shade, vertex_normals


@dataclass(frozen=True)
class RenderOutput:
    """Everything one render produces (B = batch, N = vertices, S = camera image size).

    coeffs: `(B, total)` the coefficients rendered. vertices: `(B, N, 3)` camera frame mm.
    screen: `(B, N, 3)` (u, v, depth) pixels / mm. colors: `(B, N, 3)` shaded RGB (unclamped).
    albedo: `(B, N, 3)` RGB (unclamped). image: `(B, 3, S, S)` render, 0 on background (unclamped).
    mask: `(B, 1, S, S)` 1 where the face is rasterized (detached). landmarks: `(B, 68, 2)` pixels.
    fragments: the rasterizer output.
    The per-vertex `(B, N, 3)` fields are views of `(3, B, N)` coordinate/channel planes (see `models.shading`):
    use `.reshape`, not `.view`, to flatten them.
    """

    coeffs: torch.Tensor
    vertices: torch.Tensor
    screen: torch.Tensor
    colors: torch.Tensor
    albedo: torch.Tensor
    image: torch.Tensor
    mask: torch.Tensor
    landmarks: torch.Tensor
    fragments: Fragments


class FaceRenderer(nn.Module):
    """Renders `(B, layout.total)` post-scaled coefficients with the face model and a fixed pinhole camera.

    Pose: `R = euler_rotation(angles)`, `T = camera_cfg.trans0 + trans`; light: `light + SH_INIT`; normals are
    computed in the camera frame (R is a proper rotation, so this equals rotating model-frame normals).
    """

    def __init__(self, face_model: FaceModel, camera_cfg: CameraConfig = CameraConfig(),
                 layout: CoeffLayout | None = None) -> None:
        super().__init__()
        self.face_model = face_model
        self.camera_cfg = camera_cfg
        self.layout = face_model.layout if layout is None else layout
        if self.layout != face_model.layout:
            raise ValueError(f"layout {self.layout} does not match the face model's bases {face_model.layout}")
        self.register_buffer("trans0", torch.tensor(camera_cfg.trans0, dtype=torch.float32), persistent=False)
        self._topology: MeshTopology | None = None

    @property
    def image_size(self) -> int:
        return self.camera_cfg.image_size

    def forward(self, coeffs: torch.Tensor) -> RenderOutput:
        """Render `coeffs (B, total)`; see `RenderOutput` for the shapes returned."""
        parts = self.layout.split(coeffs)
        model = self.face_model
        rotation = euler_rotation(parts.angles)  # (B, 3, 3)
        vertices = to_camera(model.vertices(parts.shape, parts.exp), rotation, self.trans0 + parts.trans)
        albedo = model.albedo(parts.tex)  # (B, N, 3)
        normals = vertex_normals(vertices, model.faces, self.topology())
        colors = shade(albedo, normals, light_with_offset(parts.light))
        screen = project(vertices, self.camera_cfg)  # (B, N, 3)
        fragments = rasterize(screen, model.faces, (self.image_size, self.image_size))
        image = interpolate(colors, fragments, model.faces)  # (B, 3, S, S), 0 on background
        return RenderOutput(coeffs=coeffs, vertices=vertices, screen=screen, colors=colors, albedo=albedo,
                            image=image, mask=fragments.mask, landmarks=_landmarks(screen, model.landmark_idx),
                            fragments=fragments)


    def topology(self) -> MeshTopology:
        """The face model's triangle list prepared for the normals; rebuilt when the mesh or its device changes."""
        faces = self.face_model.faces
        if self._topology is None or not self._topology.matches(faces, self.face_model.n_vertices):
            self._topology = mesh_topology(faces, self.face_model.n_vertices)
        return self._topology


def _landmarks(screen: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`(B, L, 2)` pixel positions of vertices `idx (L,)`, gathered from the u, v planes of `screen (B, N, 3)`."""
    return screen.permute(2, 0, 1)[:2].index_select(2, idx).permute(1, 2, 0)
