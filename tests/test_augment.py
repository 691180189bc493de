"""G2's training augmentation (utils/data/augment.py), the iBUG-68 mirror map, and their use by the datasets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.face_model import FaceModel
from models.landmarks68 import MIRROR_68, N_LANDMARKS
from models.layout import CoeffLayout
from utils.data.augment import Augmenter, AugmentParams, affine_matrix, augment_arrays, draw_params, warp_points
from utils.data.datasets import FaceDataset, collate_faces
from utils.data.image_io import write_image_rgb
from utils.data.unet_trainset import UNetTrainset, write_list, write_sample
from utils.landmarks_csv import write_landmarks_csv
from utils.training.builders import build_renderer
from utils.training.data_order import iterate_steps, make_train_loader

SIZE = 48


# ---------------------------------------------------------------- mirror map


def test_mirror_map_is_an_involution_and_a_permutation():
    assert sorted(MIRROR_68) == list(range(N_LANDMARKS))
    assert [MIRROR_68[MIRROR_68[i]] for i in range(N_LANDMARKS)] == list(range(N_LANDMARKS))
    assert MIRROR_68[36] == 45 and MIRROR_68[48] == 54 and MIRROR_68[0] == 16
    assert [i for i in range(N_LANDMARKS) if MIRROR_68[i] == i] == [8, 27, 28, 29, 30, 33, 51, 57, 62, 66]


def test_mirrored_points_of_a_symmetric_face_land_on_their_partners(demo_bfm_h5):
    """The demo face model's mean face, seen from the front, is left-right symmetric: flipping its landmark
    positions (x -> W - 1 - x) and renumbering them with the map gives the landmarks back."""
    face_model = FaceModel.from_h5(demo_bfm_h5, CoeffLayout())
    spec = {"camera": "g2", "image_size": 96, "layout": {"n_shape": 80, "n_exp": 64, "n_tex": 80}}
    landmarks = build_renderer(spec, face_model)(torch.zeros(1, CoeffLayout().total)).landmarks[0].numpy()
    assert np.ptp(landmarks[:, 0]) > 40  # a real face, not a point
    flipped = landmarks.copy()
    flipped[:, 0] = 95 - flipped[:, 0]
    np.testing.assert_allclose(flipped[list(MIRROR_68)], landmarks, atol=1e-3)
    assert np.abs(flipped - landmarks).max() > 10  # without the renumbering they would not match


# ---------------------------------------------------------------- draws and the affine


def test_draws_are_a_function_of_seed_epoch_and_index_within_g2_ranges():
    draws = [draw_params(3, e, i, (224, 224)) for e in range(10) for i in range(100)]
    assert draw_params(3, 4, 7, (224, 224)) == draws[4 * 100 + 7]
    assert draw_params(3, 4, 7, (224, 224)) != draw_params(3, 5, 7, (224, 224))
    assert draw_params(3, 4, 7, (224, 224)) != draw_params(4, 4, 7, (224, 224))
    assert draw_params(-1, 0, 0, (224, 224)) == draw_params(-1, 0, 0, (224, 224))
    shifts = np.array([[d.dx, d.dy] for d in draws])
    assert np.abs(shifts).max() <= 10 and np.abs(shifts).max() > 9.5
    assert all(0.9 <= d.scale <= 1.1 and -10 <= d.angle_deg <= 10 for d in draws)
    assert max(d.angle_deg for d in draws) > 9.5 and min(d.scale for d in draws) < 0.91
    assert 0.45 < np.mean([d.flip for d in draws]) < 0.55
    # the shift scales with the image: the same draw at 96 px moves 96/224 as far
    small = draw_params(3, 4, 7, (96, 96))
    assert small.dx == pytest.approx(draws[407].dx * 96 / 224) and small.angle_deg == draws[407].angle_deg


def test_identity_draw_is_the_identity_and_a_flip_is_an_exact_mirror():
    image = np.random.default_rng(0).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    landmarks = np.random.default_rng(1).uniform(5, SIZE - 5, size=(68, 2)).astype(np.float32)
    same = AugmentParams(0.0, 0.0, 1.0, 0.0, False)
    (out,), _, lms = augment_arrays(same, [image], [], landmarks)
    np.testing.assert_array_equal(out, image)
    np.testing.assert_allclose(lms, landmarks, atol=1e-5)
    flip = AugmentParams(0.0, 0.0, 1.0, 0.0, True)
    mask = (image[..., 0] > 128).astype(np.float32)
    (out,), (out_mask,), lms = augment_arrays(flip, [image], [mask], landmarks)
    np.testing.assert_array_equal(out, image[:, ::-1])
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])
    expected = landmarks.copy()
    expected[:, 0] = SIZE - 1 - expected[:, 0]
    np.testing.assert_allclose(lms, expected[list(MIRROR_68)], atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_landmarks_and_masks_move_with_the_image(seed):
    """A bright block at a point of the image lands where the affine sends the point; the mask goes with it."""
    params = draw_params(seed, 0, 0, (SIZE, SIZE))
    params = AugmentParams(params.dx, params.dy, params.scale, params.angle_deg, False)
    point = np.array([[20.0, 27.0]], np.float32)
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[26:29, 19:22] = 255  # a 3x3 block centred at (20, 27)
    mask = (image[..., 0] > 0).astype(np.float32)
    (out,), (out_mask,), _ = augment_arrays(params, [image], [mask])
    target = warp_points(point, affine_matrix(params, (SIZE, SIZE)))[0]
    grey = out[..., 0].astype(np.float64)
    rows, cols = np.mgrid[:SIZE, :SIZE]
    centroid = np.array([(cols * grey).sum(), (rows * grey).sum()]) / grey.sum()
    np.testing.assert_allclose(centroid, target, atol=0.3)
    assert set(np.unique(out_mask)) <= {0.0, 1.0}
    ys, xs = np.nonzero(out_mask)
    np.testing.assert_allclose([xs.mean(), ys.mean()], target, atol=1.0)


# ---------------------------------------------------------------- datasets and loaders


def _image_root(tmp_path, n=8):
    rng = np.random.default_rng(0)
    root = tmp_path / "root"
    rows = []
    for i in range(n):
        write_image_rgb(root / "Dataset" / f"f{i}.png", rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8))
        rows.append((f"f{i}.png", rng.uniform(8, SIZE - 8, size=(68, 2)).astype(np.float32)))
    write_landmarks_csv(root / "train_landmarks_3D.csv", rows)
    return root


def _batches(dataset, seed=0, start=0, steps=6, workers=0):
    loader, sampler = make_train_loader(dataset, 4, seed, workers, collate_fn=collate_faces)
    return [(step, b) for step, b in iterate_steps(loader, sampler, start, steps)]


def test_face_dataset_augments_only_keyed_items_and_plain_indices_stay_as_they_are(tmp_path):
    root = _image_root(tmp_path)
    plain = FaceDataset(root, "train", SIZE)
    augmented = FaceDataset(root, "train", SIZE, augment=Augmenter(0))
    assert augmented.epoch_keyed and not plain.epoch_keyed
    torch.testing.assert_close(augmented[3]["image"], plain[3]["image"])
    item = augmented[(2, 3)]
    assert item["index"] == 3 and not torch.equal(item["image"], plain[3]["image"])
    params = Augmenter(0).params(2, 3, (SIZE, SIZE))
    _, _, expected = augment_arrays(params, [], [np.zeros((SIZE, SIZE), np.float32)], plain[3]["landmarks"].numpy())
    np.testing.assert_allclose(item["landmarks"].numpy(), expected, atol=1e-5)


def test_two_loaders_with_one_seed_give_identical_augmented_batches_and_resume_is_exact(tmp_path):
    root = _image_root(tmp_path)
    runs = [_batches(FaceDataset(root, "train", SIZE, augment=Augmenter(0))) for _ in range(2)]
    plain = _batches(FaceDataset(root, "train", SIZE))
    for (_, a), (_, b), (_, c) in zip(*runs, plain):
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        torch.testing.assert_close(a["landmarks"], b["landmarks"], rtol=0, atol=0)
        assert a["index"].tolist() == c["index"].tolist() and not torch.equal(a["image"], c["image"])
    # epochs differ: the same image is augmented differently in epoch 0 and epoch 1 (2 batches per epoch)
    first = {i: img for _, b in runs[0][:2] for i, img in zip(b["index"].tolist(), b["image"])}
    second = {i: img for _, b in runs[0][2:4] for i, img in zip(b["index"].tolist(), b["image"])}
    assert all(not torch.equal(first[i], second[i]) for i in first)
    # a run resumed at step 3 (inside epoch 1), with worker processes this time, sees the same batches
    resumed = _batches(FaceDataset(root, "train", SIZE, augment=Augmenter(0)), start=3, workers=2)
    assert [s for s, _ in resumed] == [3, 4, 5]
    for (_, a), (_, b) in zip(runs[0][3:], resumed):
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        torch.testing.assert_close(a["landmarks"], b["landmarks"], rtol=0, atol=0)
    other_seed = _batches(FaceDataset(root, "train", SIZE, augment=Augmenter(1)), seed=0)
    assert not torch.equal(other_seed[0][1]["image"], runs[0][0][1]["image"])


def test_unet_trainset_transforms_render_image_and_target_with_one_affine(tmp_path):
    """Render = image (so aligned inputs stay equal halves) and target = the face region of the render."""
    out = tmp_path / "trainset"
    rows = []
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(4):
        face = ((xx - 20 - i) ** 2 + (yy - 24) ** 2 < 120).astype(np.float32)
        colour = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) * 0.5 + 0.5
        raster = colour * torch.from_numpy(face)[None]
        write_sample(out, f"s{i}", raster, raster, torch.from_numpy(face)[None])
        rows.append((f"s{i}", f"s{i}.png"))
    write_list(out / "train_list.csv", rows)
    dataset = UNetTrainset(out, "train", augment=Augmenter(5))
    plain = UNetTrainset(out, "train")
    for i in range(4):
        item = dataset[(1, i)]
        render, image, target = item["input"][:3], item["input"][3:], item["target"]
        torch.testing.assert_close(render, image, rtol=0, atol=0)
        assert not torch.equal(item["input"], plain[i]["input"])
        assert set(target.unique().tolist()) <= {0.0, 1.0}
        region = (render.sum(0, keepdim=True) > 1.0).float()  # the face, away from the blurred edge
        iou = (region * target).sum() / ((region + target) > 0).float().sum()
        assert iou > 0.85, (i, float(iou))
    torch.testing.assert_close(dataset[2]["input"], plain[2]["input"])


@pytest.mark.parametrize("module", ["Step1_Pretrain_MoFA", "Step3_Pretrain_Unet", "Step4_UNet_MoFA_EM"])
def test_training_steps_augment_by_default_and_no_augment_turns_it_off(module, tmp_path):
    import importlib

    from utils.data.augment import augmenter_from_args

    parse = importlib.import_module(module).parse_args
    on, off = parse(["--img_path", str(tmp_path), "--seed", "7"]), parse(["--img_path", str(tmp_path), "--no_augment"])
    assert on.augment and not off.augment
    assert augmenter_from_args(on).seed == 7 and augmenter_from_args(off) is None
    with pytest.raises(SystemExit):
        parse(["--img_path", str(tmp_path), "--augment", "--no_augment"])
