"""The fused top-1 lookup kernel against float64 math and the chunked reference.

On the CPU the kernel runs under the Triton interpreter (fp32, fp16, and bf16 with its dots decoded:
tests/kernels/conftest.py) with two bank splits, so the cross-split merge is exercised, and in
permuted program orders. The sm_90 builds are checked in test_sm90_compile.py. Exact index equality
is only asserted where the answer is unambiguous (planted neighbours, exact ties); elsewhere the
float64 score at the returned index must equal the true maximum up to the products' rounding.
"""

import pytest
import torch

from declip_fast.kernels import nn_lookup as lookup
from declip_fast.kernels import reference
from tests.kernels.gpu_like import ORDERS, program_order

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# |score error| for unit vectors: fp32 sums of exact (16-bit) or ~fp32 (tf32x3) products, a few
# fp32 epsilons times sqrt(D) in the worst case we test (D = 2048: ~5e-6); 16-bit inputs are
# compared with float64 math on the same rounded values.
SCORE_ATOL = 2e-5


def _unit(rows, d, gen, dtype, device=DEVICE):
    x = torch.nn.functional.normalize(torch.randn(rows, d, generator=gen, dtype=torch.float64), dim=-1)
    return x.to(device=device, dtype=dtype)


def _assert_top1(queries, bank, valid, scores, index):
    exact = queries.double() @ bank[:valid].double().T
    true_max = exact.max(dim=1).values
    assert index.dtype == torch.int64 and scores.dtype == torch.float32
    assert ((index >= 0) & (index < valid)).all(), "an index outside the searched rows"
    at_index = exact.gather(1, index[:, None]).squeeze(1)
    assert (at_index >= true_max - 2 * SCORE_ATOL).all(), "returned index is not a maximum"
    assert (scores.double() - at_index).abs().max() <= SCORE_ATOL, "score does not match its index"


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("b, m, d", [(1, 1, 3), (33, 1000, 100), (130, 257, 640), (7, 4099, 8)])
def test_matches_float64(b, m, d, dtype, rng):
    q, k = _unit(b, d, rng, dtype), _unit(m, d, rng, dtype)
    scores, index = lookup.nn_lookup(q, k)
    _assert_top1(q, k, m, scores, index)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_planted_neighbours_exact_indices(dtype, rng):
    """Each query is a noisy copy of a known bank row, far closer than any other: the index is
    unambiguous and must equal the plant and the reference's."""
    k = _unit(900, 64, rng, dtype)
    plant = torch.randperm(900, generator=rng)[:50].to(DEVICE)
    q = torch.nn.functional.normalize(k[plant].double() + 0.05 * _unit(50, 64, rng, torch.float64), dim=-1)
    q = q.to(dtype)
    _, index = lookup.nn_lookup(q, k)
    assert torch.equal(index, plant)
    assert torch.equal(index, reference.nn_lookup(q, k)[1])


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_exact_ties_pick_the_lowest_index(dtype, rng):
    """Copies of the answer in the same tile, later tiles of the same bank split and the other
    split (the interpreter cuts 700 rows into 11 tiles of 64, split after the 6th)."""
    k = _unit(700, 32, rng, dtype)
    q = k[[3, 100, 650]].clone()
    k[[10, 200, 300]] = q[0]  # the same tile as row 3, later tiles of split one
    k[[101, 330, 600, 699]] = q[1]  # the same tile, a later tile, the second split
    k[[651, 698]] = q[2]
    _, index = lookup.nn_lookup(q, k)
    assert index.tolist() == [3, 100, 650]
    assert reference.nn_lookup(q, k)[1].tolist() == [3, 100, 650]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_valid_ignores_the_empty_slots(dtype, rng):
    """A partly filled queue: rows past ``valid`` would win (they are the queries) but are never
    returned."""
    k = _unit(300, 48, rng, dtype)
    q = _unit(20, 48, rng, dtype)
    k[130 : 130 + 20] = q
    scores, index = lookup.nn_lookup(q, k, valid=130)
    _assert_top1(q, k, 130, scores, index)
    assert (index < 130).all()
    # Every searched score negative: the padding past ``valid`` (zeros) must not win either.
    far = (-q[:1]).expand(300, -1) + 0.3 * _unit(300, 48, rng, dtype)
    far = torch.nn.functional.normalize(far.double(), dim=-1).to(dtype)
    scores, index = lookup.nn_lookup(q[:1], far, valid=130)
    assert scores.item() < 0 and 0 <= index.item() < 130
    _assert_top1(q[:1], far, 130, scores, index)


def test_bad_inputs_name_the_problem():
    q, k = torch.randn(4, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE)
    with pytest.raises(ValueError, match="dim"):
        lookup.nn_lookup(q, torch.randn(10, 9, device=DEVICE))
    with pytest.raises(ValueError, match="valid"):
        lookup.nn_lookup(q, k, valid=11)
    with pytest.raises(ValueError, match="valid"):
        lookup.nn_lookup(q, k, valid=0)
    with pytest.raises(ValueError, match="dtype"):
        lookup.nn_lookup(q, k.double())
    with pytest.raises(ValueError, match="2-D"):
        lookup.nn_lookup(q[0], k)


# ----------------------------------------------------------------------------- program order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_in_any_program_order(dtype, rng):
    """Each (query block, bank range) program writes its own slot and the host merges slots in
    a fixed order: no result depends on the order programs run in (ties included)."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter's program order")
    k = _unit(700, 40, rng, dtype)
    q = torch.cat([_unit(150, 40, rng, dtype), k[[3, 650]]])
    k[[10, 699]] = k[3].clone()
    runs = {}
    for order in ORDERS:
        with program_order(order, seed=3):
            runs[order] = lookup.nn_lookup(q, k, valid=690)
    for order in ORDERS[1:]:
        assert all(torch.equal(x, y) for x, y in zip(runs["natural"], runs[order])), order


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "b, m, d", [(1, 1, 3), (4096, 65536, 512), (1000, 100_003, 1000), (64, 1 << 20, 128), (300, 5000, 2048)]
)
def test_gpu_matches_float64(b, m, d, dtype, rng):
    q, k = _unit(b, d, rng, dtype), _unit(m, d, rng, dtype)
    valid = m - m // 7
    scores, index = lookup.nn_lookup(q, k, valid=valid)
    exact_scores, _ = reference.nn_lookup(q.double(), k.double(), valid=valid)
    assert ((index >= 0) & (index < valid)).all()
    at_index = (q.double() * k[index].double()).sum(dim=1)
    assert (at_index >= exact_scores.double() - 2 * SCORE_ATOL).all()
    assert (scores.double() - at_index).abs().max() <= SCORE_ATOL


@pytest.mark.gpu
def test_gpu_ties_pick_the_lowest_index(rng):
    k = _unit(200_000, 256, rng, torch.bfloat16)
    q = k[[5, 150_000]].clone()
    k[[77, 199_999, 100_000]] = q[0]
    k[[150_001, 199_998]] = q[1]
    assert lookup.nn_lookup(q, k)[1].tolist() == [5, 150_000]
