"""The head around the rendered face of the synthetic benchmark: skin beyond the face crop, neck, ears, hair, clothes.

Real aligned face crops show a whole head around the face, and the evaluation region F (the rendered, cropped
face model) ends inside it. The head is drawn so that the image near F's boundary looks like such a crop, lit by
the image's spherical-harmonics (SH) light:

* skin beyond the crop and the neck: the UNCROPPED mesh of the same face model (``FaceModel.from_h5(crop=False)``)
  rendered with the image's coefficients, so geometry, albedo and light continue across F's boundary. Where that
  mesh ends (the top of the skull, the lower neck; all around F for a face-only model) a head ellipse and a neck
  band in the face frame are filled with the colours of the nearest rendered skin (a push-pull fill);
* ears: planar ear outlines attached at the widest point of the head at the height of landmarks 0 / 16, posed and
  projected with the face's camera, hidden where the head's depth buffer lies in front of them, SH-shaded with the
  albedo of the attachment vertex;
* hair: a cap above a hairline inside a skull ellipse grown by a random volume, short or long at the sides (long
  hair below the jaw hangs behind the neck), strands radiating from the crown, SH-shaded on the ellipsoid's normals
  with a sheen band; 10 % of heads are bald, 10 % have a buzz cut;
* clothes below a neckline (textured, SH-shaded on a cylinder's normals).

No head pixel is drawn on F: the head is not face in the ground truth and F's pixels stay the rendered face. Hair
that falls over the forehead into F is the 'hair' occluder, whose strands take the head's hair colour.

Face-frame coordinates (`utils.synthetic.occluders.FaceFrame`): x along the eye line in inter-ocular distances
(iod), y down the face in eye-to-mouth distances, origin between the eyes. Everything is numpy / OpenCV except
`HeadRenderer`, which renders with the project's torch renderer; all randomness comes from the generator passed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from models.camera import CameraConfig, euler_rotation
from models.face_model import FaceModel
from models.layout import N_LIGHT, CoeffLayout, light_with_offset
from models.rasterizer import interpolate, rasterize
from models.renderer import FaceRenderer
from models.shading import shade, vertex_normals
from utils.synthetic.occluders import (
    HAIR_COLOURS,
    FaceFrame,
    TextureBank,
    fill_polygon,
    value_noise,
)

HEAD_HAIR_COLOURS = np.vstack([HAIR_COLOURS, HAIR_COLOURS[:3], np.array([  # RGB albedo: blondes, grey
    [0.72, 0.58, 0.36], [0.82, 0.70, 0.48], [0.50, 0.48, 0.46]], dtype=np.float32)])
"""Albedo of head hair: the occluders' hair colours (dark ones twice), two blondes and grey."""
HAIR_STYLES = {"short": 0.45, "long": 0.35, "bald": 0.1, "buzz": 0.1}
"""Head-hair styles and their probabilities."""
SHADOW_GRID = 192
"""Side of the light-space depth map of `HeadRenderer.render`'s cast shadows (pixels)."""
SHADOW_BIAS_MM = 2.5
"""A surface point is in shadow when it lies this much behind the light-space depth map."""


def sh_irradiance(light: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """SH irradiance ``(..., 3)`` float32 at unit camera-frame normals ``(..., 3)`` for offset-free light ``(27,)``.

    The face renderer's own shading, `models.shading.shade` of a white albedo with `light_with_offset(light)`,
    run in float64 on the CPU (the generator's precision), so the head and the items are lit exactly as the face.
    """
    normals64 = torch.from_numpy(np.asarray(normals, np.float64).reshape(1, -1, 3))
    sh = light_with_offset(torch.from_numpy(np.asarray(light, np.float64).reshape(1, N_LIGHT)))
    irradiance = shade(torch.ones_like(normals64), normals64, sh)[0].contiguous()  # (N, 3) in C order: numpy's
    # reductions over it (e.g. the specular tint's mean) sum in the same order as over any other (N, 3) array
    return irradiance.numpy().reshape(*np.shape(normals)[:-1], 3).astype(np.float32)


# ----- rendering the full head --------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadSample:
    """The uncropped face model rendered for one image (S = image size), float32 numpy.

    rgb ``(S, S, 3)`` in [0, 1]; coverage ``(S, S)`` bool; zbuf ``(S, S)`` camera depth mm (inf off the mesh);
    normals ``(S, S, 3)`` unit camera-frame normals and points ``(S, S, 3)`` camera-frame mm (0 off the mesh);
    ears ``(2, 3)`` camera-frame attachment points (model x < 0 first); ear_albedo ``(2, 3)`` RGB at them;
    rotation ``(3, 3)`` model -> camera; shadow ``(S, S)`` bool points hidden from the key light, or None.
    """

    rgb: np.ndarray
    coverage: np.ndarray
    zbuf: np.ndarray
    normals: np.ndarray
    points: np.ndarray
    ears: np.ndarray
    ear_albedo: np.ndarray
    rotation: np.ndarray
    shadow: np.ndarray | None = None


def ear_vertices(model: FaceModel) -> np.ndarray:
    """``(2,)`` vertex ids of the ear attachment points of an uncropped model: the widest vertex on each side
    (model x < 0, then x > 0) within 10 mm of the height of landmarks 0 and 16 (the jaw's top ends)."""
    points = model.mean_shape.detach().cpu().double().numpy()
    height = points[model.landmark_idx[[0, 16]].cpu().numpy(), 1].mean()
    band = np.abs(points[:, 1] - height) < 10.0
    ids = []
    for side in (-1.0, 1.0):
        reach = np.where(band, side * points[:, 0], -np.inf)
        ids.append(int(np.argmax(reach)))
    return np.asarray(ids, dtype=np.int64)


def _light_basis(direction: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 3)`` rows e1, e2, e3 of right-handed light-view frames looking along ``-direction (B, 3)``."""
    e3 = -direction / direction.norm(dim=1, keepdim=True)
    hint = torch.where((e3[:, 1:2].abs() > 0.9), e3.new_tensor([1.0, 0.0, 0.0]), e3.new_tensor([0.0, 1.0, 0.0]))
    e1 = torch.linalg.cross(hint.expand_as(e3), e3)
    e1 = e1 / e1.norm(dim=1, keepdim=True)
    return torch.stack([e1, torch.linalg.cross(e3, e1), e3], dim=1)


def cast_shadows(vertices: torch.Tensor, faces: torch.Tensor, direction: torch.Tensor, points: torch.Tensor,
                 covered: torch.Tensor, grid: int = SHADOW_GRID, bias_mm: float = SHADOW_BIAS_MM) -> torch.Tensor:
    """Points hidden from a directional light by the mesh itself (shadow mapping, orthographic light view).

    Args:
        vertices: ``(B, N, 3)`` camera-frame mesh; faces ``(F, 3)``; direction: ``(B, 3)`` towards the light.
        points: ``(B, S, S, 3)`` camera-frame surface points of the image pixels; covered: ``(B, S, S)`` bool.
    Returns:
        ``(B, S, S)`` bool, True where a covered pixel's point lies behind the mesh seen from the light.
    """
    basis = _light_basis(direction.to(vertices.dtype))  # (B, 3, 3)
    light_verts = vertices @ basis.transpose(1, 2)  # (B, N, 3): (u, v, depth from the light)
    low = light_verts.amin(dim=1, keepdim=True)
    extent = (light_verts.amax(dim=1, keepdim=True) - low)[..., :2].amax(dim=2, keepdim=True)
    scale = (grid - 1) / extent.clamp_min(1e-6)  # (B, 1, 1) pixels per mm
    offset = low - low.new_tensor([0.0, 0.0, 1.0])  # depth >= 1 mm: in front of the near plane

    def to_map(p: torch.Tensor) -> torch.Tensor:
        q = p - offset
        return torch.cat([q[..., :2] * scale, q[..., 2:]], dim=-1)

    depth = rasterize(to_map(light_verts), faces, (grid, grid)).zbuf  # (B, G, G)
    B, S = points.shape[0], points.shape[1]
    mapped = to_map(points.reshape(B, -1, 3) @ basis.transpose(1, 2))  # (B, S*S, 3)
    col = mapped[..., 0].round().clamp(0, grid - 1).long()
    row = mapped[..., 1].round().clamp(0, grid - 1).long()
    nearest = depth.reshape(B, -1).gather(1, row * grid + col)
    return (mapped[..., 2] > nearest + bias_mm).reshape(B, S, S) & covered


class HeadRenderer:
    """Renders the uncropped face model with the synthetic images' coefficients and camera.

    Args:
        bfm_path: the face model h5 of the faces; layout, camera: those of the face renderer.
    """

    def __init__(self, bfm_path: str | Path, layout: CoeffLayout, camera: CameraConfig, device: torch.device,
                 dtype: torch.dtype = torch.float64) -> None:
        model = FaceModel.from_h5(bfm_path, layout, crop=False)
        self.renderer = FaceRenderer(model, camera, layout).to(device, dtype)
        self.ear_ids = torch.from_numpy(ear_vertices(model)).to(device)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def render(self, coeffs: np.ndarray, key_lights: np.ndarray | None = None) -> list[HeadSample]:
        """Render ``coeffs (B, total)``; ``key_lights (B, 3)`` camera-frame directions towards the light (NaN rows:
        no shadow) add the cast-shadow masks. Returns one `HeadSample` per image."""
        coeffs_t = torch.from_numpy(coeffs).to(self.device, self.dtype)
        out = self.renderer(coeffs_t)
        faces = self.renderer.face_model.faces
        frags = out.fragments
        normals = interpolate(vertex_normals(out.vertices, faces), frags, faces)  # (B, 3, S, S)
        normals = normals / normals.norm(dim=1, keepdim=True).clamp_min(1e-9)
        points = interpolate(out.vertices, frags, faces).permute(0, 2, 3, 1)
        covered = frags.pix_to_face >= 0
        shadow = None
        if key_lights is not None:
            want = np.isfinite(key_lights).all(axis=1)
            shadow = torch.zeros_like(covered)
            if want.any():
                idx = torch.from_numpy(np.flatnonzero(want)).to(self.device)
                dirs = torch.from_numpy(key_lights[want]).to(self.device, self.dtype)
                shadow[idx] = cast_shadows(out.vertices[idx], faces, dirs, points[idx], covered[idx])
            shadow = shadow.cpu().numpy()
        rotation = euler_rotation(self.renderer.layout.split(coeffs_t).angles).float().cpu().numpy()
        def to_np(t: torch.Tensor) -> np.ndarray:
            return t.float().cpu().numpy()

        rgb, zbuf = to_np(out.image.clamp(0, 1).permute(0, 2, 3, 1)), to_np(frags.zbuf)
        normals, points, covered = to_np(normals.permute(0, 2, 3, 1)), to_np(points), covered.cpu().numpy()
        ears = to_np(out.vertices[:, self.ear_ids].reshape(-1, 2, 3))
        ear_albedo = to_np(out.albedo[:, self.ear_ids].reshape(-1, 2, 3).clamp(0, 1))
        return [HeadSample(rgb[k], covered[k], zbuf[k], normals[k], points[k], ears[k], ear_albedo[k], rotation[k],
                           None if shadow is None or not np.isfinite(key_lights[k]).all() else shadow[k])
                for k in range(len(coeffs))]


# ----- drawing ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadLayers:
    """A head drawn around the face (``(S, S)`` maps float32 in [0, 1] unless noted).

    image ``(S, S, 3)``: background + head (the face region not yet pasted); skin: visible head skin outside the
    face region; person: everything of the head (skin, ears, hair, clothes); hair_colour ``(3,)`` albedo RGB.
    """

    image: np.ndarray
    skin: np.ndarray
    person: np.ndarray
    hair_colour: np.ndarray


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def push_pull_fill(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill unknown pixels of ``values (S, S, 3)`` with the mask-weighted average of the nearest ``known (S, S)``
    ones, coarse to fine (a push-pull pyramid): a smooth continuation of the known colours."""
    levels = [(values * known[..., None], known.astype(np.float32))]
    while min(levels[-1][1].shape) > 2:
        v, w = levels[-1]
        half = (max(1, w.shape[1] // 2), max(1, w.shape[0] // 2))
        levels.append((cv2.resize(v, half, interpolation=cv2.INTER_AREA),
                       cv2.resize(w, half, interpolation=cv2.INTER_AREA)))
    v, w = levels[-1]
    filled = v.reshape(-1, 3).sum(0) / max(float(w.sum()), 1e-6) * np.ones_like(v)
    for v, w in reversed(levels):
        up = cv2.resize(filled, (w.shape[1], w.shape[0]), interpolation=cv2.INTER_LINEAR)
        weight = np.clip(w * 4.0, 0.0, 1.0)[..., None]
        filled = np.where(w[..., None] > 1e-6, v / np.maximum(w, 1e-6)[..., None], up) * weight + up * (1 - weight)
    return filled.astype(np.float32)


@dataclass(frozen=True)
class _HeadGeometry:
    """Measures of the head in the face frame: centre x, half width (iod) at eye level, chin y, sizes in pixels."""

    cx: float
    half_width: float
    chin_y: float


def _measure(frame: FaceFrame, grid: np.ndarray, body: np.ndarray) -> _HeadGeometry:
    band = body & (grid[..., 1] > -0.6) & (grid[..., 1] < 0.2)
    if band.sum() < 4:
        return _HeadGeometry(0.0, 1.2, float(frame.to_face(frame.landmarks[8])[1]))
    xs = grid[..., 0][band]
    low, high = float(xs.min()), float(xs.max())
    return _HeadGeometry(0.5 * (low + high), max(0.5 * (high - low), 0.9),
                         float(frame.to_face(frame.landmarks[8])[1]))


def _ellipse_normals(frame: FaceFrame, grid: np.ndarray, centre: tuple[float, float], half: tuple[float, float],
                     lowest: float = 1.0) -> np.ndarray:
    """``(S, S, 3)`` camera-frame normals of an ellipsoid seen face-on, its outline the face-frame ellipse
    (centre, half axes); below ``lowest`` (in half-axis units) the normals stop turning down (a hanging drape)."""
    u = (grid[..., 0] - centre[0]) / half[0]
    w = np.minimum((grid[..., 1] - centre[1]) / half[1], lowest)
    r2 = np.minimum(u * u + w * w, 0.97)
    scale = np.sqrt(r2 / np.maximum(u * u + w * w, 1e-9))
    u, w = u * scale, w * scale
    planar = u[..., None] * frame.x_axis + w[..., None] * frame.down  # image x right, y down
    normals = np.concatenate([planar, -np.sqrt(1.0 - r2)[..., None]], axis=-1)
    return normals / np.linalg.norm(normals, axis=-1, keepdims=True)


def _strands(rng: np.random.Generator, grid: np.ndarray, crown: tuple[float, float], count: float) -> np.ndarray:
    """Strand texture ``(S, S)`` in [0, 1]: thin streaks radiating from the crown (``count`` strands around it)."""
    angle = np.arctan2(grid[..., 0] - crown[0], grid[..., 1] - crown[1])  # 0 = straight down
    phase = (angle / (2.0 * np.pi) + 0.5) * count
    texture = np.zeros(angle.shape, np.float32)
    for weight, factor in ((0.6, 1.0), (0.4, 2.7)):
        table = rng.random(int(count * factor) + 2).astype(np.float32)
        pos = phase * factor
        texture += weight * np.interp(pos, np.arange(len(table)), table, period=len(table) - 1)
    return texture


def draw_hair(frame: FaceFrame, grid: np.ndarray, geometry: _HeadGeometry, face: np.ndarray, light: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Head hair: rgb ``(S, S, 3)``, front alpha and behind alpha ``(S, S)`` (behind = long hair below the jaw,
    under the neck and clothes) and the albedo colour ``(3,)``. Never on the face region."""
    size = face.shape[0]
    style = rng.choice(list(HAIR_STYLES), p=list(HAIR_STYLES.values()))
    colour = HEAD_HAIR_COLOURS[int(rng.integers(len(HEAD_HAIR_COLOURS)))] * rng.uniform(0.85, 1.15, 3)
    colour = np.clip(colour, 0.02, 0.95).astype(np.float32)
    zero = np.zeros((size, size), np.float32)
    if style == "bald":
        return np.zeros((size, size, 3), np.float32), zero, zero, colour
    gx, gy = grid[..., 0] - geometry.cx, grid[..., 1]
    volume = 0.0 if style == "buzz" else rng.uniform(0.04, 0.3)
    yc, top = 0.1, -rng.uniform(1.55, 1.75) - volume
    half = (geometry.half_width + volume, yc - top)
    outer = (gx / half[0]) ** 2 + ((gy - yc) / half[1]) ** 2 < 1.0
    hairline = rng.uniform(-1.2, -0.95) + rng.uniform(0.1, 0.5) * gx ** 2
    temple = rng.uniform(0.75, 1.0) * geometry.half_width
    if style == "long":
        flare = rng.uniform(0.0, 0.25)
        length = rng.uniform(1.4, 3.5)
        drape = (gy > yc) & (np.abs(gx) < half[0] + flare * (gy - yc)) & (gy < length)
        inner = temple * rng.uniform(0.85, 1.0) * (1.0 - rng.uniform(0.0, 0.12) * np.clip(gy, 0.0, 1.5))
        sides = (np.abs(gx) > inner) & (gy < length)
        region = (outer | drape) & ((gy < hairline) | sides)
    else:
        side_low = rng.uniform(-0.35, 0.05)
        region = outer & ((gy < hairline) | ((np.abs(gx) > temple) & (gy < side_low)))
    iod_px = frame.iod
    inside = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 3)
    strands = _strands(rng, grid, (geometry.cx, top + 0.45), rng.uniform(250.0, 500.0))
    clumps = value_noise(rng, size, size, cells=rng.uniform(4.0, 9.0))
    soft = max(0.8, rng.uniform(0.01, 0.03) * iod_px)
    ragged = rng.uniform(0.5, 2.0) * max(1.0, 0.02 * iod_px)
    alpha = np.clip((inside - ragged * (1.0 - strands)) / soft, 0.0, 1.0)
    outside_face = cv2.distanceTransform((~face).astype(np.uint8), cv2.DIST_L2, 3)
    alpha *= _smoothstep(outside_face / max(1.0, rng.uniform(0.0, 0.06) * iod_px))
    if style == "buzz":
        alpha *= rng.uniform(0.35, 0.6) * (0.7 + 0.3 * strands)
    normals = _ellipse_normals(frame, grid, (geometry.cx, yc), half, lowest=0.3)
    shade = sh_irradiance(light, normals)
    texture = (0.8 + 0.4 * (strands - 0.5) + 0.35 * (clumps - 0.5))[..., None]
    band_y = -0.55 * half[1] + rng.uniform(-0.15, 0.15)
    sheen = rng.uniform(0.04, 0.22) * np.exp(-(((gy - yc) - band_y) / (0.12 * half[1])) ** 2) * strands
    rgb = colour * shade * texture + sheen[..., None] * shade.mean(-1, keepdims=True) * 0.6
    behind = (gy > geometry.chin_y - 0.3).astype(np.float32) if style == "long" else zero
    return (np.clip(rgb, 0, 1).astype(np.float32), (alpha * (1 - behind)).astype(np.float32),
            (alpha * behind).astype(np.float32), colour)


def draw_ears(sample: HeadSample, camera: CameraConfig, light: np.ndarray, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """Both ears: rgb ``(S, S, 3)`` and alpha ``(S, S)``, visible where the head's depth buffer does not hide them."""
    size = sample.coverage.shape[0]
    centre = camera.principal_point[0]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    rays = np.stack([(xs - centre) / camera.focal, (ys - centre) / camera.focal, np.ones_like(xs)], -1)
    rgb = np.zeros((size, size, 3), np.float32)
    alpha = np.zeros((size, size), np.float32)
    width, height = rng.uniform(24.0, 32.0), rng.uniform(52.0, 66.0)
    lift, protrude = rng.uniform(0.0, 8.0), np.radians(rng.uniform(12.0, 30.0))
    t = np.linspace(0.0, 2.0 * np.pi, 32, endpoint=False)
    taper = np.where(np.sin(t) < 0, 0.75 + 0.25 * (1 + np.sin(t)), 1.0)  # narrower lobe
    p = width * (0.45 + 0.5 * np.cos(t) * taper)
    q = lift + 0.5 * height * np.sin(t) * np.where(np.sin(t) < 0, 0.9, 1.0)
    inner_p, inner_q = width * (0.45 + 0.28 * np.cos(t)), lift - 3.0 + 0.24 * height * np.sin(t)
    for side, anchor, albedo in zip((-1.0, 1.0), sample.ears, sample.ear_albedo):
        up = sample.rotation @ np.array([0.0, 1.0, 0.0])
        back = sample.rotation @ np.array([side * np.sin(protrude), 0.0, -np.cos(protrude)])
        normal = sample.rotation @ np.array([side * np.cos(protrude), 0.0, np.sin(protrude)])

        def project(pp: np.ndarray, qq: np.ndarray, anchor=anchor, back=back, up=up) -> np.ndarray:
            pts = anchor + pp[:, None] * back + qq[:, None] * up
            return pts[:, :2] / pts[:, 2:3] * camera.focal + centre

        outline = project(p - 2.0, q)
        shape = fill_polygon(size, outline)
        if shape.max() <= 0.0:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = (normal @ anchor) / (rays @ normal)
        visible = np.where(sample.coverage, sample.zbuf > depth - 4.0, True) & (depth > 0)
        facing = normal if normal @ anchor < 0 else -normal
        shade = sh_irradiance(light, facing[None])[0]
        concha = 1.0 - 0.3 * fill_polygon(size, project(inner_p, inner_q))
        colour = albedo * shade * concha[..., None]
        a = shape * visible
        rgb = np.where((a > alpha)[..., None], colour, rgb)
        alpha = np.maximum(alpha, a)
    return np.clip(rgb, 0, 1).astype(np.float32), alpha


def draw_clothes(frame: FaceFrame, grid: np.ndarray, geometry: _HeadGeometry, coverage: np.ndarray,
                 light: np.ndarray, rng: np.random.Generator, textures: TextureBank) -> tuple[np.ndarray, np.ndarray]:
    """Clothes below a neckline (above the end of the neck mesh ``coverage (S, S)``): rgb ``(S, S, 3)``, alpha."""
    size = grid.shape[0]
    gx, gy = grid[..., 0] - geometry.cx, grid[..., 1]
    collar = geometry.chin_y + rng.uniform(0.25, 0.5)
    neck = (np.abs(gx) < 0.4) & (gy > geometry.chin_y)
    if (neck & ~coverage).any() and (neck & coverage).any():
        collar = min(collar, float(gy[neck & coverage].max()) - 0.1)
    opening, dip = rng.uniform(0.45, 0.95), rng.uniform(0.0, 0.35)
    shoulder = rng.uniform(0.3, 0.8)
    edge = np.where(np.abs(gx) < opening, collar + dip * (1.0 - (gx / opening) ** 2),
                    collar + shoulder * (np.abs(gx) - opening))
    soft = max(0.6, 0.01 * frame.iod) / max(frame.eye_mouth, 1.0)
    alpha = _smoothstep((gy - edge) / soft + 0.5).astype(np.float32)
    if rng.random() < 0.5:
        base = textures.texture(rng, size, size) * 0.6 + rng.uniform(0.05, 0.9, 3) * 0.4
    else:
        base = rng.uniform(0.05, 0.9, 3) * (0.85 + 0.3 * value_noise(rng, size, size, cells=12.0))[..., None]
    u = np.clip(gx / (2.2 * geometry.half_width), -0.95, 0.95)
    normals = np.stack([u, np.full_like(u, -0.25), -np.sqrt(1.0 - u * u)], -1)
    normals = normals / np.linalg.norm(normals, axis=-1, keepdims=True)
    rgb = base * sh_irradiance(light, normals) * 0.8
    return np.clip(rgb, 0, 1).astype(np.float32), alpha


def draw_head(background: np.ndarray, face: np.ndarray, sample: HeadSample, landmarks: np.ndarray,
              light: np.ndarray, camera: CameraConfig, rng: np.random.Generator, textures: TextureBank
              ) -> HeadLayers:
    """Draw the head of one image over ``background (S, S, 3)`` around the face region ``face (S, S)`` bool.

    Args:
        sample: the image's uncropped render; landmarks: ``(68, 2)`` true landmark pixels; light: ``(27,)`` the
        image's offset-free SH light; camera: the image's camera.
    """
    size = face.shape[0]
    frame = FaceFrame(landmarks)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    grid = frame.to_face(np.stack([xs, ys], -1))
    mesh = sample.coverage & ~face
    geometry = _measure(frame, grid, sample.coverage | face)
    gx, gy = grid[..., 0] - geometry.cx, grid[..., 1]
    proxy = (gx / geometry.half_width) ** 2 + ((gy - 0.2) / np.where(gy < 0.2, 1.75, 1.45)) ** 2 < 1.0
    known = sample.coverage | face
    skin_rgb = np.where(sample.coverage[..., None], sample.rgb, 0.0).astype(np.float32)
    fill = proxy & ~known
    if fill.any():
        skin_rgb = np.where(fill[..., None], push_pull_fill(skin_rgb, known), skin_rgb)
    skin = (mesh | fill).astype(np.float32)
    image = np.where(skin[..., None] > 0, skin_rgb, background)
    hair_rgb, hair_front, hair_behind, colour = draw_hair(frame, grid, geometry, face, light, rng)
    behind = hair_behind * (1.0 - skin)
    image = image * (1 - behind[..., None]) + hair_rgb * behind[..., None]
    ear_rgb, ear_alpha = draw_ears(sample, camera, light, rng)
    ear_alpha = ear_alpha * (1.0 - face)
    image = image * (1 - ear_alpha[..., None]) + ear_rgb * ear_alpha[..., None]
    cloth_rgb, cloth_alpha = draw_clothes(frame, grid, geometry, sample.coverage, light, rng, textures)
    cloth_alpha = cloth_alpha * (1.0 - face)
    image = image * (1 - cloth_alpha[..., None]) + cloth_rgb * cloth_alpha[..., None]
    hair_front = hair_front * (1.0 - face)
    image = image * (1 - hair_front[..., None]) + hair_rgb * hair_front[..., None]
    covered = 1.0 - (1.0 - ear_alpha) * (1.0 - cloth_alpha) * (1.0 - hair_front)
    visible_skin = skin * (1.0 - covered)
    person = 1.0 - (1.0 - skin) * (1.0 - behind) * (1.0 - covered)
    return HeadLayers(image.astype(np.float32), visible_skin.astype(np.float32), person.astype(np.float32), colour)
