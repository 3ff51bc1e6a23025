"""Worker threads for the CPU paths (declip_fast.kernels.cpu_threads): each worker's ops are
single-threaded, thread counts and grad mode are restored and propagated, results are the same
bits on every run and match one thread's up to fp32 summation order, and the lookup's ties still
resolve to the lowest index when chunks interleave across workers."""

import threading

import pytest
import torch

from declip_fast.kernels import cpu_threads, linear_cross_entropy, reference, reference_lookup


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_workers_run_single_threaded_ops_and_restore(two_threads):
    seen = []

    def work(part):
        seen.append(
            (
                threading.get_ident(),
                torch.get_num_threads(),
                torch.is_grad_enabled(),
                cpu_threads.workers_for(torch.device("cpu"), 8),
            )
        )
        return sum(part)

    assert cpu_threads.workers_for(torch.device("cpu"), 8) == 2
    assert cpu_threads.workers_for(torch.device("cpu"), 1) == 1
    assert cpu_threads.workers_for(torch.device("meta"), 8) == 1
    parts = cpu_threads.split(list(range(7)), 2)
    assert parts == [[0, 2, 4, 6], [1, 3, 5]]
    with torch.no_grad():
        assert cpu_threads.run_parts(work, parts) == [12, 9]
    assert threading.get_ident() not in {s[0] for s in seen}  # worker threads, not the caller
    assert all(s[1:] == (1, False, 1) for s in seen)  # 1 op thread, caller's grad mode, no nesting
    assert torch.get_num_threads() == 2


def test_balanced_blocks_divide_evenly():
    for n, block, workers in [(720, 256, 2), (1000, 256, 3), (5, 256, 2), (4096, 64, 2), (7, 2, 2)]:
        b = cpu_threads.balanced_block(n, block, workers)
        count = -(-n // b)
        assert b <= block and (count % workers == 0 or n <= workers), (n, block, workers, b)
    assert cpu_threads.balanced_block(720, 256, 1) == 256


def _runs(fn, n=3):
    return [fn() for _ in range(n)]


def test_paths_are_deterministic_and_match_one_thread(two_threads):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=gen, requires_grad=True)
    w = torch.randn(5000, 16, generator=gen, requires_grad=True)
    t = torch.randint(0, 5000, (600,), generator=gen)
    a = torch.nn.functional.normalize(torch.randn(700, 32, generator=gen), dim=-1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(700, 32, generator=gen), dim=-1).requires_grad_()
    s = torch.tensor(14.0, requires_grad=True)

    def ce():
        loss = linear_cross_entropy(x, w, None, t, tile=(128, 1024))
        return [loss.detach(), *torch.autograd.grad(loss, (x, w))]

    def clip():
        loss = reference.clip_loss(a, b, s, block=(128, 256))
        return [loss.detach(), *torch.autograd.grad(loss, (a, b, s))]

    for fn in (ce, clip):
        two = _runs(fn)
        for other in two[1:]:
            assert all(torch.equal(p, q) for p, q in zip(two[0], other))
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(2)
        for p, q in zip(two[0], one):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # fp32 summation order


def test_lookup_ties_across_workers_pick_the_lowest_index(two_threads, monkeypatch):
    """Chunks (6 of 184 rows here) alternate between the two workers: a tie between row 300
    (chunk 1, worker 1) and row 900 (chunk 4, worker 0) must still return row 300."""
    monkeypatch.setattr(reference_lookup, "LOOKUP_CHUNK_ELEMENTS", 1)  # where the torch lookup reads it
    gen = torch.Generator().manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(1100, 24, generator=gen), dim=-1)
    q = bank[[300, 20]].clone()
    bank[[600, 900]] = q[0]  # 300 in chunk 1, 600 in chunk 2, 900 in chunk 3
    bank[[280, 1050]] = q[1]  # 20 in chunk 0, 280 in chunk 1
    assert reference.nn_lookup(q, bank)[1].tolist() == [300, 20]
