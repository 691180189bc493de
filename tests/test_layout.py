"""CoeffLayout: sizes, slices, split/join round trip and the SH offset."""
from __future__ import annotations

import math

import pytest
import torch

from models.layout import FIELDS, SH_INIT, CoeffLayout, light_with_offset
from tests.helpers import assert_close


def test_default_total_and_order():
    layout = CoeffLayout()
    assert layout.total == 80 + 64 + 80 + 3 + 3 + 27 == 257
    stops = [0]
    for name in FIELDS:
        part = layout.slice(name)
        assert part.start == stops[-1], f"{name} does not start where the previous block ends"
        stops.append(part.stop)
    assert stops[-1] == layout.total
    assert layout.slice("tex") == slice(144, 224)
    assert layout.slice("light") == slice(230, 257)


def test_custom_layout_sizes():
    layout = CoeffLayout(n_shape=10, n_exp=5, n_tex=7)
    assert layout.total == 10 + 5 + 7 + 33
    assert layout.slice("angles") == slice(22, 25)


def test_split_returns_views_and_join_round_trips():
    layout = CoeffLayout(n_shape=4, n_exp=3, n_tex=2)
    coeffs = torch.randn(5, layout.total)
    parts = layout.split(coeffs)
    assert parts.shape.shape == (5, 4) and parts.light.shape == (5, 27) and parts.trans.shape == (5, 3)
    assert_close(parts.exp, coeffs[:, 4:7], msg="exp block")
    assert parts.tex.data_ptr() == coeffs[:, 7:9].data_ptr(), "split must return views, not copies"
    assert torch.equal(layout.join(parts), coeffs)


def test_bad_inputs_raise():
    layout = CoeffLayout()
    with pytest.raises(ValueError, match="257"):
        layout.split(torch.zeros(2, 256))
    with pytest.raises(KeyError, match="bogus"):
        layout.slice("bogus")
    parts = layout.split(torch.zeros(2, 257))
    bad = type(parts)(**{**parts.__dict__, "exp": torch.zeros(2, 63)})
    with pytest.raises(ValueError, match="'exp'"):
        layout.join(bad)
    with pytest.raises(ValueError, match="n_shape"):
        CoeffLayout(n_shape=0)


def test_light_offset_only_on_dc_of_each_channel():
    light = torch.randn(3, 27)
    shifted = light_with_offset(light)
    delta = shifted - light
    expected = torch.zeros(27)
    expected[[0, 9, 18]] = 0.7 * 2 * math.pi
    assert_close(delta, expected.expand(3, 27), atol=1e-5, msg="SH offset")
    assert_close(torch.tensor(SH_INIT), expected, msg="SH_INIT")
    assert not torch.equal(shifted, light), "light_with_offset must return a new tensor"
