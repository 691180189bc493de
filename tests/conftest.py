"""Session fixtures shared by the whole suite: tiny and demo face models, seeding, CUDA skipping."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.helpers import HAS_CUDA, tiny_bfm_arrays, write_bfm_h5


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `@pytest.mark.cuda` when no CUDA device is present."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_bfm_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic model (375 vertices, 672 triangles, 100/70/90 components) in the exact BFM2017 h5 layout.

    A sphere patch of radius 100 mm facing +z whose sides fall outside the G1 crop; its 68 landmarks
    (`metadata/landmarks/ibug68_vertex_indices`) lie inside it. See `tests.helpers.tiny_bfm_arrays`.
    """
    return write_bfm_h5(tmp_path_factory.mktemp("tiny_bfm") / "tiny_bfm.h5", tiny_bfm_arrays(seed=0))


@pytest.fixture(scope="session")
def demo_bfm_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The procedural demo face model written by
    `utils.synthetic.demo_face_model.write_demo_face_model(path, seed=0)`."""
    if importlib.util.find_spec("utils.synthetic.demo_face_model") is None:
        pytest.skip("utils/synthetic/demo_face_model.py does not exist yet: the demo face model cannot be generated")
    from utils.synthetic.demo_face_model import write_demo_face_model

    path = tmp_path_factory.mktemp("demo_bfm") / "demo_face_model.h5"
    write_demo_face_model(path, seed=0)
    return path
