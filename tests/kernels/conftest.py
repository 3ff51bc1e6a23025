"""Kernel tests on the CPU run under the Triton interpreter with bf16 dots decoded (see
tests/kernels/gpu_like.py), so bf16 kernels are checked against float64 like fp16 and fp32."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _bf16_dots_as_numbers():
    if torch.cuda.is_available():
        yield
        return
    from tests.kernels.gpu_like import decoded_bf16_dots

    with decoded_bf16_dots():
        yield
