"""Segmentation, landmark and vertex metrics on hand-made cases with known answers, including empty masks."""
import math

import pytest
import torch

from utils.evaluation import metrics as Mt


def _m(rows):
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def _metrics(gt, est, region=None, **kw):
    counts = Mt.confusion_counts(gt, est, region, **kw)
    return [c.item() for c in counts], {k: v.item() for k, v in Mt.mask_metrics(*counts).items()}


def test_counts_and_metrics_asymmetric_case():
    gt = _m([[1, 1], [1, 0]])
    est = _m([[0.7, 0.9], [0.2, 0.1]])
    counts, m = _metrics(gt, est)
    assert counts == [2, 0, 1, 1]  # tp, fp, tn, fn
    expected = {"iou": 2 / 3, "occluder_iou": 1 / 2, "accuracy": 3 / 4, "precision": 1.0, "recall": 2 / 3,
                "f1": 4 / 5}
    assert m == pytest.approx(expected)


def test_region_restricts_counting_and_threshold_is_inclusive():
    gt = _m([[1, 1], [1, 0]])
    est = _m([[0.5, 0.9], [0.2, 0.1]])
    counts, _ = _metrics(gt, est, region=_m([[1, 1], [0, 1]]))
    assert counts == [2, 0, 1, 0]
    counts, _ = _metrics(gt, est, threshold=0.6)
    assert counts == [1, 0, 1, 2]


def test_soft_counts_reproduce_original():
    gt = _m([[1.0, 0.0]])
    est = _m([[0.7, 0.4]])
    counts, _ = _metrics(gt, est, soft=True)
    assert counts == pytest.approx([0.7, 0.4, 0.6, 0.3])


@pytest.mark.parametrize("gt_value, est_value, expected", [
    (0.0, 0.0, dict(iou=1, occluder_iou=1, accuracy=1, precision=1, recall=1, f1=1)),  # no face anywhere
    (1.0, 1.0, dict(iou=1, occluder_iou=1, accuracy=1, precision=1, recall=1, f1=1)),  # no occluder anywhere
    (1.0, 0.0, dict(iou=0, occluder_iou=0, accuracy=0, precision=0, recall=0, f1=0)),  # all face missed
    (0.0, 1.0, dict(iou=0, occluder_iou=0, accuracy=0, precision=0, recall=0, f1=0)),  # all occluder missed
])
def test_empty_denominators(gt_value, est_value, expected):
    _, m = _metrics(torch.full((1, 1, 2, 2), gt_value), torch.full((1, 1, 2, 2), est_value))
    assert m == pytest.approx({k: float(v) for k, v in expected.items()})


def test_empty_region_is_perfect_not_nan():
    _, m = _metrics(_m([[1, 0]]), _m([[0, 1]]), region=_m([[0, 0]]))
    assert all(v == 1.0 for v in m.values())


def test_metrics_are_per_image_and_pooled():
    gt = torch.cat([_m([[1, 1], [0, 0]]), _m([[1, 1], [1, 1]])])
    est = torch.cat([_m([[1, 0], [1, 0]]), _m([[1, 1], [1, 1]])])
    tp, fp, tn, fn = Mt.confusion_counts(gt, est)
    per = Mt.mask_metrics(tp, fp, tn, fn)
    assert per["iou"].tolist() == pytest.approx([1 / 3, 1.0])
    pooled = Mt.pooled_metrics(tp, fp, tn, fn)  # tp 5, fp 1, tn 1, fn 1
    assert pooled["iou"] == pytest.approx(5 / 7)
    assert pooled["accuracy"] == pytest.approx(6 / 8)
    rows = [{k: v[i] for k, v in per.items()} for i in range(2)]
    summary = Mt.summarise(rows)
    assert summary["iou"] == pytest.approx({"mean": 2 / 3, "std": 1 / 3, "n": 2})


def test_summarise_skips_nan():
    s = Mt.summarise([{"a": 1.0, "b": math.nan}, {"a": 0.5, "b": math.nan}, {"a": math.nan}])
    assert s["a"] == pytest.approx({"mean": 0.75, "std": 0.25, "n": 2})
    assert s["b"]["n"] == 0 and math.isnan(s["b"]["mean"])


def test_landmark_error_split_by_visibility():
    gt = torch.zeros(2, 4, 2)
    pred = gt.clone()
    pred[:, :2] += torch.tensor([3.0, 4.0])  # points 0, 1 off by 5 px
    visible = torch.tensor([[True, True, False, False], [True, True, True, True]])
    err = Mt.landmark_error(pred, gt, visible)
    assert err["all"].tolist() == pytest.approx([2.5, 2.5])
    assert err["visible"].tolist() == pytest.approx([5.0, 2.5])
    assert err["occluded"][0].item() == pytest.approx(0.0) and math.isnan(err["occluded"][1].item())


def _rotation(axis_angle):
    K = torch.zeros(3, 3, dtype=torch.float64)
    x, y, z = axis_angle
    K[0, 1], K[0, 2], K[1, 2] = -z, y, -x
    K = K - K.T
    return torch.matrix_exp(K)


def test_rigid_align_recovers_rigid_motion_and_vertex_error():
    torch.manual_seed(0)
    src = torch.randn(50, 3, dtype=torch.float64) * 30
    Rm = _rotation((0.3, -0.5, 1.1))
    dst = src @ Rm.T + torch.tensor([5.0, -2.0, 40.0], dtype=torch.float64)
    assert torch.allclose(Mt.rigid_align(src, dst), dst, atol=1e-8)
    assert Mt.vertex_error_mm(src, dst).item() == pytest.approx(0.0, abs=1e-8)
    batched = Mt.vertex_error_mm(torch.stack([src, src]), torch.stack([dst, 2 * dst]))
    assert batched[0].item() == pytest.approx(0.0, abs=1e-8) and batched[1].item() > 1.0  # no scale fitting


def test_rigid_align_never_reflects():
    torch.manual_seed(1)
    src = torch.randn(20, 3, dtype=torch.float64)
    mirrored = src * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    aligned = Mt.rigid_align(src, mirrored)
    # the aligned set is a proper rotation of src: pairwise distances kept, orientation (det) kept
    assert torch.allclose(torch.cdist(aligned, aligned), torch.cdist(src, src), atol=1e-9)
    a = aligned[1:4] - aligned[0]
    s = src[1:4] - src[0]
    assert torch.sign(torch.linalg.det(a)) == torch.sign(torch.linalg.det(s))
    assert Mt.vertex_error_mm(src, mirrored).item() > 1e-3
