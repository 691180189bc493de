"""Values where other tests check only shapes: landmarks of an enlarged image, and reconstruct.py's overlay colours."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import reconstruct
from utils.data.datasets import FaceDataset
from utils.data.image_io import write_image_rgb
from utils.landmarks_csv import write_landmarks_csv


def test_landmarks_follow_an_enlarging_resize(tmp_path):
    """Bright 2x2 blocks at the landmarks of a 20 px image; enlarged to 64 px they are centred on the scaled points."""
    image = np.zeros((20, 20, 3), np.uint8)
    points = np.array([[4.5, 5.5], [14.5, 3.5], [9.5, 15.5]], dtype=np.float32)  # block centres (2x2 blocks)
    for x, y in points:
        image[int(y):int(y) + 2, int(x):int(x) + 2] = 255
    landmarks = np.zeros((68, 2), np.float32)
    landmarks[:3] = points
    write_image_rgb(tmp_path / "Dataset" / "small.png", image)
    write_landmarks_csv(tmp_path / "train_landmarks_3D.csv", [("small.png", landmarks)])
    item = FaceDataset(tmp_path, "train", image_size=64)[0]
    scaled = item["landmarks"][:3].numpy()
    np.testing.assert_allclose(scaled, (points + 0.5) * 64 / 20 - 0.5, rtol=1e-6)
    grey = item["image"][0].numpy()
    rows, cols = np.mgrid[0:64, 0:64]
    for k, (x, y) in enumerate(scaled):
        window = grey * ((np.abs(cols - x) < 6) & (np.abs(rows - y) < 6))
        centroid = np.array([(cols * window).sum(), (rows * window).sum()]) / window.sum()
        np.testing.assert_allclose(centroid, [x, y], atol=0.1, err_msg=f"point {k}")


def test_overlay_tints_visible_face_green_and_occluders_red():
    images = torch.full((1, 3, 2, 3), 0.5)
    region = torch.tensor([[[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]]])  # last column outside the rendered face
    mask = torch.tensor([[[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]]])  # first column visible, middle column occluded
    out = reconstruct.overlay(images, mask, region)
    a = reconstruct.TINT_ALPHA
    visible = 0.5 * (1 - a) + a * torch.tensor(reconstruct.VISIBLE_TINT)
    occluded = 0.5 * (1 - a) + a * torch.tensor(reconstruct.OCCLUDED_TINT)
    for row in range(2):
        torch.testing.assert_close(out[0, :, row, 0], visible)
        torch.testing.assert_close(out[0, :, row, 1], occluded)
        torch.testing.assert_close(out[0, :, row, 2], images[0, :, row, 2])  # background unchanged
    assert reconstruct.VISIBLE_TINT == (0.0, 1.0, 0.0) and reconstruct.OCCLUDED_TINT == (1.0, 0.0, 0.0)
    assert out[0, 1, 0, 0] > out[0, 0, 0, 0] and out[0, 0, 0, 1] > out[0, 1, 0, 1] == pytest.approx(0.3)
