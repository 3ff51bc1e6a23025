"""Shared fixtures of the evaluation tests: a small demo data set, read by FFCV without numba.

Importing FFCV alone costs 10-25 s here (numba compiles at import), so only the tests that read a
``.beton`` touch it; they are marked slow.
"""

import pytest

DEMO_TRAIN, DEMO_TEST = 64, 200  # enough test images for a chance-level bound on 10 classes


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from ffcv.pipeline.compiler import Compiler

    from declip_fast.data.demo import ensure_demo_data

    data = ensure_demo_data(tmp_path_factory.mktemp("demo"), train_size=DEMO_TRAIN, test_size=DEMO_TEST,
                            workers=1)
    enabled = Compiler.is_enabled
    Compiler.set_enabled(False)  # FFCV pipelines as plain Python: compiling costs more than tiny epochs
    yield data
    Compiler.set_enabled(enabled)
