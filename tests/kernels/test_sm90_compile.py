"""The sm_90 compile helper works, and can tell a clean kernel from one that spills."""

import pytest
import torch

from tests.sm90 import compile_sm90

SIGNATURE = {
    "a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32",
    "M": "i32", "N": "i32", "K": "i32",
    "BM": "constexpr", "BN": "constexpr", "BK": "constexpr",
}


def _spec(bm, bn, bk, num_warps):
    return dict(
        module="tests.kernels.toy_kernels", kernel="_toy_matmul", signature=SIGNATURE,
        constexprs=dict(BM=bm, BN=bn, BK=bk), num_warps=num_warps, num_stages=3,
    )


def test_compiles_for_hopper_and_reports_resources():
    clean, spilling = compile_sm90([_spec(128, 128, 32, 8), _spec(128, 256, 32, 4)])
    # A 128x128 fp16 tile on two warp groups: Hopper's wgmma, 64 accumulator registers a thread.
    assert clean.name == "_toy_matmul" and clean.has_wgmma
    assert 0 < clean.registers <= 255 and clean.spills == 0 and clean.shared > 0
    # A 128x256 fp32 accumulator alone needs 256 registers a thread on 4 warps (the limit is
    # 255): it must spill, and the helper must see it.
    assert spilling.registers == 255 and spilling.spills > 0


def test_toy_kernel_is_right_under_the_interpreter():
    """The subject kernel itself is correct (interpreter on CPU, or the GPU)."""
    from tests.kernels.toy_kernels import _toy_matmul

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(70, 40, dtype=torch.float16, device=device)
    b = torch.randn(40, 50, dtype=torch.float16, device=device)
    c = torch.empty(70, 50, dtype=torch.float32, device=device)
    _toy_matmul[(2, 1)](a, b, c, 70, 50, 40, BM=64, BN=64, BK=32)
    expected = a.double() @ b.double()
    # fp16 inputs are exact in the fp32 accumulator; only the sum order differs.
    assert torch.allclose(c.double(), expected, atol=1e-3, rtol=1e-5)
