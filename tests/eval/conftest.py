"""Shared fixtures of the evaluation tests: a small demo data set, read by FFCV without numba.

Importing FFCV alone costs 10-25 s here (numba compiles at import), so only the tests that read a
``.beton`` touch it; they are marked slow.
"""

import pytest

DEMO_TRAIN, DEMO_TEST = 64, 200  # enough test images for a chance-level bound on 10 classes


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory):
    from declip_fast.data.demo import ensure_demo_data

    return ensure_demo_data(tmp_path_factory.mktemp("demo"), train_size=DEMO_TRAIN, test_size=DEMO_TEST, workers=1)


@pytest.fixture(scope="module")
def demo_data(demo_files):
    """The demo files, read with FFCV's pipelines as plain Python (compiling costs more than tiny
    epochs) in this module only: FFCV's switch is global, and a session-wide switch once left
    every later test (the demo training run among them) decoding in plain Python."""
    from ffcv.pipeline.compiler import Compiler

    enabled = Compiler.is_enabled
    Compiler.set_enabled(False)
    yield demo_files
    Compiler.set_enabled(enabled)
