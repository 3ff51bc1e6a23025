"""Cross-entropy of a linear layer's output without storing the logits: the torch implementation
of ``declip_fast.kernels.linear_cross_entropy`` (the functional API, which picks the
implementation; this is the only one so far, used on every device).

``F.cross_entropy(F.linear(x, weight, bias), targets)`` over a big vocabulary stores ``[K, V]``
logits, their log-softmax and, in the backward, a gradient of the same size (for the MLM head,
V = 49,409: ~140 MB per 720 positions in fp32, three times over, each freshly allocated). Here
the logits exist one tile (rows x vocabulary columns) at a time, in one reused buffer, and the
gradients for ``x``, ``weight`` and ``bias`` are taken in the forward; the backward only scales
them by the incoming gradient.

Per block of rows: pass 1 runs over the vocabulary tiles keeping an online log-sum-exp (and picks
each row's target logit); pass 2 recomputes each tile, turns it into ``scale * (softmax -
onehot)`` in place and takes the three gradients from it. On the CPU the tiles are small enough
to stay in cache, which at the MLM head's shapes (D = 64, V = 49,409) more than pays for the one
extra matmul: forward + backward is faster than the unfused pair's. On accelerators one tile
spans the vocabulary, pass 1 leaves ``exp(logits - max)`` in the buffer and pass 2 reuses it:
the unfused pair's three matmuls, ``rows x V`` fp32 of memory instead of three ``K x V``.

Numerics: logits, log-sum-exp and the softmax are fp32 (fp64 for fp64 inputs) whatever the
inputs' dtype (16-bit inputs are multiplied in their own dtype and upcast, as autocast's
``F.linear`` would); gradients are accumulated in fp32 and returned in the inputs' dtypes. Under
autocast the inputs are cast to the autocast dtype first, like ``F.linear``.

FSDP: call it from inside the module that owns ``weight`` (``MLMHead.loss``), where FSDP2 has the
parameter unsharded; the weight's gradient flows back through autograd as usual.

Until this release it lived in ``declip_fast.losses.linear_ce`` (now a deprecated alias): the MLM
head in ``models`` uses it, so it sits in ``kernels``, below both ``models`` and ``losses``.
"""

from __future__ import annotations

import torch

from declip_fast.kernels import cpu_threads

IGNORE_INDEX = -100


def default_tile(device: torch.device, vocab: int) -> tuple[int, int]:
    """(rows, vocabulary columns) of logits held at once. CPU: 256 x 2048 (2 MB fp32, stays in
    cache; measured best of 1024..8192 columns at D = 64, V = 49,409). Accelerators: the whole
    vocabulary in one tile (no recompute), rows up to 64 Mi logits (256 MB fp32)."""
    if device.type == "cpu":
        return 256, 2048
    return max(1, (1 << 26) // vocab), vocab


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    tile: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias), targets, ignore_index=..., reduction=...)``.

    ``x [K, D]``, ``weight [V, D]``, ``bias [V]`` or None, ``targets [K]`` int64 in ``[0, V)`` or
    ``ignore_index``. ``reduction``: ``"mean"`` (over the rows not ignored; 0, still connected to
    the graph, when every row is ignored: no host sync to ask) or ``"sum"``. ``tile``: (rows,
    columns) of logits held at once, :func:`default_tile` when None. No ``impl``: the choice is
    made by ``declip_fast.kernels.linear_cross_entropy``, which calls this.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be [K, D] and [V, D]")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} must be [V] = [{weight.shape[0]}]")
    if targets.shape != (x.shape[0],) or targets.is_floating_point():
        raise ValueError(f"targets must be integer [K] = [{x.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if not (x.device == weight.device == targets.device):
        raise ValueError(f"x, weight and targets on different devices: {x.device}, {weight.device}, {targets.device}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"dtypes differ: x {x.dtype}, weight {weight.dtype}, bias {None if bias is None else bias.dtype}"
        )
    tile = tuple(tile) if tile is not None else default_tile(x.device, weight.shape[0])
    if len(tile) != 2 or min(tile) < 1:
        raise ValueError(f"tile must be (rows, columns) >= 1, got {tile!r}")
    return _LinearCrossEntropy.apply(x, weight, bias, targets.long(), ignore_index, reduction == "mean", tile)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, ignore_index, mean, tile):
        with torch.autocast(x.device.type, enabled=False):
            loss, grads = _forward(x, weight, bias, targets, ignore_index, mean, tile, need=ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ctx.saved_tensors  # None where that gradient was not needed
        out = [None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*out, None, None, None, None)


def _check_range(targets: torch.Tensor, v: int, ignore_index: int) -> None:
    in_range = ((targets >= 0) & (targets < v)).all()
    message = f"targets must lie in [0, {v}) or equal ignore_index={ignore_index}"
    if targets.device.type == "cpu":
        if not bool(in_range):
            raise ValueError(message)
    else:  # no host sync: fails at the next synchronisation, with the message
        torch._assert_async(in_range, message)


def _forward(x, weight, bias, targets, ignore_index, mean, tile, need):
    k, v = x.shape[0], weight.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    valid = targets != ignore_index
    # Each row's weight in the reduction: 1 (sum) or 1/count (mean); 0 for ignored rows.
    row_scale = valid.to(acc)
    if mean:
        row_scale = row_scale / valid.sum().clamp(min=1)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    _check_range(safe_targets, v, ignore_index)
    need = (need[0], need[1], need[2] and bias is not None)
    grad_x = torch.zeros(k, x.shape[1], device=x.device, dtype=acc) if need[0] else None
    rows, cols = max(1, min(tile[0], k)), max(1, min(tile[1], v))
    # Row blocks are independent: on the CPU they are spread over worker threads (each with its
    # own tile buffer and weight/bias gradient), which a busy machine cannot stall op by op.
    workers = cpu_threads.workers_for(x.device, -(-k // rows))
    rows = cpu_threads.balanced_block(k, rows, workers)
    starts = list(range(0, k, rows))
    parts = cpu_threads.split(starts, workers)

    def run(my_starts):
        grad_w = torch.zeros(v, weight.shape[1], device=x.device, dtype=acc) if need[1] else None
        grad_b = torch.zeros(v, device=x.device, dtype=acc) if need[2] else None
        buffer = torch.empty(rows, cols, device=x.device, dtype=acc)
        loss = torch.zeros((), device=x.device, dtype=acc)
        for start in my_starts:
            loss += _row_block(
                x[start : start + rows],
                weight,
                bias,
                safe_targets[start : start + rows],
                row_scale[start : start + rows],
                buffer,
                need,
                None if grad_x is None else grad_x[start : start + rows],
                grad_w,
                grad_b,
            )
        return loss, grad_w, grad_b

    results = cpu_threads.run_parts(run, parts)
    loss, grad_w, grad_b = results[0]
    for other_loss, other_w, other_b in results[1:]:  # in worker order: the same bits every run
        loss = loss + other_loss
        grad_w = None if grad_w is None else grad_w.add_(other_w)
        grad_b = None if grad_b is None else grad_b.add_(other_b)
    return loss, (grad_x, grad_w, grad_b)


def _row_block(xb, weight, bias, tb, sb, buffer, need, grad_x, grad_w, grad_b):
    """Loss of one block of rows (pass 1), and its gradients added into ``grad_x`` (its rows),
    ``grad_w`` and ``grad_b`` (pass 2)."""
    n, v, acc = xb.shape[0], weight.shape[0], buffer.dtype
    cols = buffer.shape[1]
    columns = [(j, min(cols, v - j)) for j in range(0, v, cols)]

    def logits_of(j, c):
        out = buffer[:n, :c]
        w = weight[j : j + c]
        if xb.dtype == acc:
            if bias is None:
                torch.mm(xb, w.t(), out=out)
            else:
                torch.addmm(bias[j : j + c], xb, w.t(), out=out)
        else:  # 16-bit product, as autocast's F.linear, upcast for the softmax
            out.copy_(xb @ w.t())
            if bias is not None:
                out.add_(bias[j : j + c].to(acc))
        return out

    # Pass 1: online log-sum-exp over the vocabulary tiles, and the target's logit.
    row_max = torch.full((n,), float("-inf"), device=xb.device, dtype=acc)
    sum_exp = torch.zeros(n, device=xb.device, dtype=acc)
    target_logit = torch.zeros(n, device=xb.device, dtype=acc)
    for j, c in columns:
        logits = logits_of(j, c)
        inside = (tb >= j) & (tb < j + c)
        picked = logits.gather(1, (tb - j).clamp(0, c - 1)[:, None]).squeeze(1)
        target_logit += torch.where(inside, picked, torch.zeros_like(picked))
        new_max = torch.maximum(row_max, logits.amax(dim=1))
        sum_exp.mul_((row_max - new_max).exp())
        row_max = new_max
        sum_exp += logits.sub_(new_max[:, None]).exp_().sum(dim=1)
    lse = row_max + sum_exp.log()
    loss = ((lse - target_logit) * sb).sum()
    if not any(need):
        return loss
    # Pass 2: d loss / d logits = scale * (softmax - onehot(target)), tile by tile. With one
    # tile spanning the vocabulary, pass 1 left exp(logits - max) in the buffer: no recompute.
    for j, c in columns:
        if len(columns) == 1:
            grad = buffer[:n, :c].mul_((sb / sum_exp)[:, None])
        else:
            grad = logits_of(j, c).sub_(lse[:, None]).exp_().mul_(sb[:, None])
        inside = (tb >= j) & (tb < j + c)
        local = (tb - j).clamp(0, c - 1)[:, None]
        grad.scatter_add_(1, local, torch.where(inside, -sb, torch.zeros_like(sb))[:, None])
        g = grad if xb.dtype == acc else grad.to(xb.dtype)
        w = weight[j : j + c]
        if need[0]:
            grad_x += g @ w
        if need[1]:  # 16-bit products (as autograd's) accumulated in fp32
            grad_w[j : j + c] += g.t() @ xb
        if need[2]:
            grad_b[j : j + c] += grad.sum(dim=0)
    return loss
