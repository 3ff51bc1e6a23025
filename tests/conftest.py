"""Test-wide set-up: the Triton interpreter on CPU-only machines, and the markers.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is decided here,
before a test module imports declip_fast.kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng():
    """A fresh, seeded generator per test: random inputs, reproducible failures."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The loader tests' pair set (tests/data/pairs.py), built once per module that asks."""
    from tests.data.pairs import build_pairs

    return build_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def ffcv_uncompiled():
    """FFCV's JIT compiler off for one module (tiny epochs compile slower than they run), back on
    after it: modules opt in with ``pytestmark = pytest.mark.usefixtures("ffcv_uncompiled")``."""
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(True)
