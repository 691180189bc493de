"""The head and the out-of-model appearance items of the synthetic benchmark (utils/synthetic/head.py, appearance)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from models.camera import CameraConfig
from models.layout import N_SH_BASIS, CoeffLayout
from utils.data.image_io import read_mask
from utils.landmarks_csv import read_landmarks_csv
from utils.synthetic import appearance as app
from utils.synthetic.faces import (
    RENDER_DTYPE,
    SceneRanges,
    choose_category,
    degrade,
    generate_dataset,
    image_rng,
    make_background,
    place_occluder,
    render_batch,
    sample_coefficients,
    visible_landmark_string,
)
from utils.synthetic.head import HeadRenderer
from utils.synthetic.occluders import TextureBank, draw_occluder

SIZE = 64


@pytest.fixture(scope="module")
def textures() -> TextureBank:
    return TextureBank.from_skimage(("coffee", "brick"))


@pytest.fixture(scope="module")
def scene(demo_bfm_h5: Path) -> dict:
    """A near-frontal face of the demo model with a directional light, its render and its head render."""
    from models.face_model import FaceModel
    from models.renderer import FaceRenderer

    layout = CoeffLayout()
    camera = CameraConfig.preset("g2").resized(SIZE)
    renderer = FaceRenderer(FaceModel.from_h5(demo_bfm_h5, layout), camera, layout).to(dtype=RENDER_DTYPE)
    coeffs = layout.zeros(1).numpy().astype(np.float32)
    coeffs[0, layout.slice("angles")] = np.radians([5.0, 15.0, 0.0])
    light = np.zeros((3, N_SH_BASIS), np.float32)
    light[:, 1:4] = 0.6 * np.array([0.5, -0.6, 0.5])  # band 1 of a light from the upper right, camera side
    coeffs[0, layout.slice("light")] = light.reshape(-1)
    rgb, coverage, landmarks = render_batch(renderer, coeffs, torch.device("cpu"))
    head = HeadRenderer(demo_bfm_h5, layout, camera, torch.device("cpu"))
    key = app.key_light(coeffs[0, layout.slice("light")], np.random.default_rng(0))
    sample = head.render(coeffs, key[None])[0]
    return {"rgb": rgb[0], "face": coverage[0] > 0.5, "landmarks": landmarks[0], "head": sample, "camera": camera,
            "light": coeffs[0, layout.slice("light")], "key": key}


def dressed(scene: dict, items: tuple[str, ...], seed: int, textures: TextureBank) -> tuple[np.ndarray, dict]:
    """The image dressed with `items` and what it is made of (background, head layers, canvas masks)."""
    rng = np.random.default_rng(seed)
    background = np.full((SIZE, SIZE, 3), 0.5, np.float32)
    plan = app.AppearancePlan(items, scene["key"])
    image, hair = app.dress(background, scene["rgb"], scene["face"], scene["landmarks"], scene["head"], plan,
                            scene["light"], scene["camera"], rng, textures)
    return image, {"background": background, "hair": hair}


def test_key_light_recovers_the_direction_of_band_1() -> None:
    for direction in ([0.3, -0.5, -0.81], [-0.7, 0.1, -0.7], [0.0, 0.0, -1.0]):
        l_dir = np.asarray(direction) / np.linalg.norm(direction)
        sh = np.zeros((3, N_SH_BASIS))
        sh[:, 1:4] = 0.8 * np.array([-l_dir[1], l_dir[2], -l_dir[0]])  # basis order -y, z, -x
        found = app.key_light(sh.reshape(-1), np.random.default_rng(0))
        np.testing.assert_allclose(found, l_dir, atol=1e-9)
    weak = app.key_light(np.zeros(27), np.random.default_rng(1))  # no band 1: a random camera-side light
    assert np.isclose(np.linalg.norm(weak), 1.0) and weak[2] < 0.0


def test_choose_items_follows_the_config() -> None:
    rng = np.random.default_rng(0)
    plain = app.AppearanceConfig(plain_share=1.0)
    assert all(app.choose_items(rng, plain) == () for _ in range(20))
    every = app.AppearanceConfig(plain_share=0.0, facial_hair=1.0, **{n: 1.0 for n in app.APPEARANCE_ITEMS[3:]})
    items = app.choose_items(rng, every)
    assert set(app.APPEARANCE_ITEMS[3:]) <= set(items) and set(items) & {"stubble", "beard", "moustache"}
    assert list(items) == [n for n in app.APPEARANCE_ITEMS if n in items]
    assert app.appearance_label(()) == "none" and app.appearance_label(("beard", "specular")) == "beard+specular"


def test_the_head_leaves_the_face_region_alone(scene: dict, textures: TextureBank) -> None:
    image, parts = dressed(scene, (), seed=0, textures=textures)
    face = scene["face"]
    np.testing.assert_array_equal(image[face], np.clip(scene["rgb"][face], 0, 1))
    changed = np.abs(image - parts["background"]).max(-1) > 1e-6
    assert changed[~face].mean() > 0.3, "no head around the face"
    assert len(parts["hair"]) == 3 and (0.0 <= parts["hair"]).all()


@pytest.mark.parametrize("item", app.APPEARANCE_ITEMS)
def test_each_item_is_present_and_changes_only_the_subject(item: str, scene: dict, textures: TextureBank) -> None:
    face = scene["face"]
    for seed in range(3):
        bare, _ = dressed(scene, (), seed=seed, textures=textures)
        rng = np.random.default_rng(seed)
        layers = app.draw_head(np.full((SIZE, SIZE, 3), 0.5, np.float32), face, scene["head"], scene["landmarks"],
                               scene["light"], scene["camera"], rng, textures)
        with_item, _ = dressed(scene, (item,), seed=seed, textures=textures)
        changed = np.abs(with_item - bare).max(-1) > 1.0 / 255.0
        allowed = layers.person > 0 if item == "cast_shadow" else (layers.skin > 0) | face
        allowed |= face
        assert not (changed & ~allowed).any(), f"{item} (seed {seed}) changed pixels off the subject"
        assert (changed & face).sum() >= 3, f"{item} (seed {seed}) left the face unchanged"


def test_cast_shadows_fall_away_from_the_light(scene: dict, demo_bfm_h5: Path) -> None:
    layout = CoeffLayout()
    head = HeadRenderer(demo_bfm_h5, layout, scene["camera"], torch.device("cpu"))
    coeffs = np.zeros((2, layout.total), np.float32)
    side = np.array([0.8, -0.2, -0.55])
    sample_front, sample_side = head.render(coeffs, np.stack([[0.0, 0.0, -1.0], side / np.linalg.norm(side)]))
    face = scene["face"]
    assert sample_front.shadow[face].mean() < 0.01, "a light from the camera casts no shadow on the face"
    shadow = sample_side.shadow & face
    assert shadow.mean() > 0.005
    cols = np.nonzero(shadow)[1]
    nose_col = scene["landmarks"][30, 0]
    assert np.median(cols) < nose_col + 2, "the shadow should fall on the side away from the light (image left)"


def test_hair_occluder_takes_the_head_colour(scene: dict, textures: TextureBank) -> None:
    colour = np.array([0.6, 0.2, 0.05], np.float32)
    plain = draw_occluder("hair", scene["landmarks"], SIZE, np.random.default_rng(3), textures)
    tinted = draw_occluder("hair", scene["landmarks"], SIZE, np.random.default_rng(3), textures, hair_colour=colour)
    np.testing.assert_array_equal(plain.alpha, tinted.alpha)
    strands = tinted.alpha > 0.5
    ratio = tinted.rgb[strands] / colour
    assert np.allclose(ratio, ratio[:, :1], atol=1e-4), "the strands are not shades of the head's hair colour"


def ground_truth(root: Path) -> list[dict[str, str]]:
    with (root / "ground_truth.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_appearance_changes_images_but_no_ground_truth(demo_bfm_h5: Path, textures: TextureBank,
                                                        tmp_path: Path) -> None:
    """Same scenes with and without appearance; masks, landmarks and coefficients equal; appearance-only
    images (no occluder) have the rendered face region as mask."""
    mixed, bare = tmp_path / "mixed", tmp_path / "bare"
    config = app.AppearanceConfig(plain_share=0.0, facial_hair=0.5, specular=0.5, cast_shadow=0.5)
    summary = generate_dataset(demo_bfm_h5, mixed, 8, seed=4, size=SIZE, textures=textures,
                               appearance_config=config)
    generate_dataset(demo_bfm_h5, bare, 8, seed=4, size=SIZE, textures=textures, appearance="none")
    rows_m, rows_b = ground_truth(mixed), ground_truth(bare)
    assert [{**r, "appearance": ""} for r in rows_m] == [{**r, "appearance": ""} for r in rows_b]
    assert {r["appearance"] for r in rows_b} == {"none"}
    assert all(set(r["appearance"].split("+")) <= set(app.APPEARANCE_ITEMS) for r in rows_m)
    assert sum(r["appearance"] != "none" for r in rows_m) >= 6 and summary["appearance"] == "mixed"
    assert read_landmarks_csv(mixed / "all_landmarks_3D.csv")[0][0] == read_landmarks_csv(
        bare / "all_landmarks_3D.csv")[0][0]
    differ = 0
    for row in rows_m:
        mask_m = read_mask(mixed / "Dataset" / row["filename"].replace(".png", "_visible_skin_mask.png"))
        mask_b = read_mask(bare / "Dataset" / row["filename"].replace(".png", "_visible_skin_mask.png"))
        np.testing.assert_array_equal(mask_m, mask_b)
        image = row["filename"]
        differ += (mixed / "Dataset" / image).read_bytes() != (bare / "Dataset" / image).read_bytes()
    assert differ == len(rows_m)
    only = tmp_path / "appearance_only"
    generate_dataset(demo_bfm_h5, only, 4, seed=5, occlusion="none", size=SIZE, textures=textures,
                     appearance_config=app.AppearanceConfig(plain_share=0.0, specular=1.0, moles=1.0))
    for row in ground_truth(only):
        assert "moles" in row["appearance"] and float(row["occluded_fraction"]) == 0.0


def test_appearance_none_renders_the_bare_pipeline(demo_bfm_h5: Path, textures: TextureBank, tmp_path: Path
                                                   ) -> None:
    """`--appearance none` writes, byte for byte, what background + face + occluder + degradation give."""
    from models.face_model import FaceModel
    from models.renderer import FaceRenderer
    from utils.data.image_io import write_image_rgb

    generate_dataset(demo_bfm_h5, tmp_path / "gen", 3, seed=9, size=SIZE, textures=textures, appearance="none")
    layout, ranges = CoeffLayout(), SceneRanges()
    renderer = FaceRenderer(FaceModel.from_h5(demo_bfm_h5, layout), CameraConfig.preset("g2").resized(SIZE),
                            layout).to(dtype=RENDER_DTYPE)
    for index in range(3):
        rng = image_rng(9, index)
        coeffs = sample_coefficients(layout, rng, ranges)[None]
        category = choose_category(rng, "mixed", ranges)
        rgb, coverage, landmarks = render_batch(renderer, coeffs, torch.device("cpu"))
        face = coverage[0] > 0.5
        image = np.where(face[..., None], rgb[0], make_background(rng, SIZE, textures))
        if category != "none":
            occ_rgb, alpha = place_occluder(category, landmarks[0], face, rng, textures, ranges)
            image = alpha[..., None] * occ_rgb + (1.0 - alpha[..., None]) * image
            visible_landmark_string(landmarks[0], alpha > 0.5)
        rng.normal(0.0, 1.0, landmarks[0].shape)  # the landmark noise comes before the degradation
        write_image_rgb(tmp_path / "expected.png", degrade(image.astype(np.float32), rng, ranges))
        name = f"{index:05d}.png"
        assert (tmp_path / "gen" / "Dataset" / name).read_bytes() == (tmp_path / "expected.png").read_bytes(), name
