"""sm_90 builds: the compile helper works and tells a clean kernel from one that spills; its
specialisation rule is Triton's launcher's; every Hopper config of the project's kernels compiles
as a real launch would build it, without spills, within the register ceiling, on wgmma."""

import pytest
import torch

from benchmarks.sm90 import compile_sm90, contrastive_specs, hopper_problems, lookup_specs, specialize

SIGNATURE = {
    "a_ptr": "*fp16",
    "b_ptr": "*fp16",
    "c_ptr": "*fp32",
    "M": "i32",
    "N": "i32",
    "K": "i32",
    "BM": "constexpr",
    "BN": "constexpr",
    "BK": "constexpr",
}


def _spec(bm, bn, bk, num_warps):
    return dict(
        module="tests.kernels.toy_kernels",
        kernel="_toy_matmul",
        signature=SIGNATURE,
        constexprs=dict(BM=bm, BN=bn, BK=bk),
        num_warps=num_warps,
        num_stages=3,
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


def test_specialisation_rule_is_the_launchers():
    """benchmarks.sm90.specialize against Triton's own launch-time specialisation."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    values = dict(M=1, N=16, K=0, D=1000, S=512, T=-32)
    signature = dict(a_ptr="*bf16", **{k: "i32" for k in values})
    sig, constants, hints = specialize(signature, values)
    for name, value in values.items():
        kind, key = native_specialize_impl(CUDABackend, value, False, True, True)
        if kind == "constexpr":
            assert constants[name] == value and sig[name] == "constexpr", name
        else:
            assert (key == "D") == (name in hints), name
    aligned = torch.empty(64, dtype=torch.bfloat16)
    assert native_specialize_impl(CUDABackend, aligned, False, True, True)[1] == "D"
    assert "a_ptr" in hints


SHAPES = [(32768, 512), (32768, 1000), (4096, 64)]  # D a multiple of 16, not one, and small


def _project_specs(specialized=True):
    specs = []
    for dtype in ("bfloat16", "float16", "float32"):
        for n, d in SHAPES if specialized else SHAPES[:1]:
            specs += contrastive_specs(n, d, dtype, specialized) + lookup_specs(4096, n, d, dtype, specialized)
    return specs


@pytest.mark.slow
def test_every_hopper_config_builds_clean_as_launched():
    """Each config at D = 512, 1000 and 64, specialised as a launch with contiguous inputs is:
    no spills, at most MAX_REGISTERS registers, wgmma for 16-bit inputs; the forward keeps its
    barrier between writing and re-reading column statistics."""
    specs = _project_specs()
    problems = hopper_problems(specs)
    assert not problems, "\n".join(problems)
    fwd = [s for s in specs if s["kernel"] == "_fwd_kernel"]
    for res in compile_sm90(fwd[:1]):
        assert res.barriers >= 1


@pytest.mark.slow
def test_plain_builds_compile():
    """Without the launch's specialisation (unaligned pointers, strides as runtime values) every
    config still compiles for sm_90; the launchers copy inputs to unit stride, so such builds
    only run with misaligned views, and their spills are reported, not refused."""
    specs = _project_specs(specialized=False)
    for spec, res in zip(specs, compile_sm90(specs)):
        assert res.registers <= 255 and res.shared > 0, spec["config"]
