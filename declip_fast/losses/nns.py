"""Nearest-neighbour supervision (NNS): a GPU-resident feature queue and DeCLIP's NNS loss.

DeCLIP keeps a FIFO queue of L2-normalized, detached text embeddings. Each text embedding of
the batch is replaced by its top-1 cosine neighbour in the queue, and the neighbours serve as the
text side of a one-direction image->text InfoNCE, for every (image view, text view) pair,
averaged. Then the batch's text embeddings are enqueued.

Where this differs from the original code, and why:

- The queue lives on the features' device and is never copied to the host: the original kept a
  CPU queue per rank and copied it to the GPU every step (tens of MB per step, and a sync).
- Every rank enqueues the *gathered* global batch in rank order (one all-gather), so all ranks
  hold the same queue, and the job computes exactly the single-process loss over the global
  batch (gradients averaged across ranks), as the distributed CLIP loss does.
- The write pointer and fill count are Python ints (``get_extra_state``), identical on all ranks
  by construction: deciding whether the queue is ready, or where to write, never syncs a GPU.
- The neighbours of one step are looked up in one call (all text views stacked) and gathered in
  one collective: the bank is read once per step, whatever the number of text views.
- A batch with a non-finite value is never enqueued (``FeatureQueue.enqueue`` refuses it, checking
  the gathered rows so that every rank decides alike): one NaN row would be every query's
  neighbour-to-be or poison the scores for ``queue_size / B`` steps after a single skipped step.
  ``NNSLoss`` then returns a NaN loss (also while the queue fills), so the step is non-finite
  and a trainer that skips non-finite steps skips it. The check reads one boolean from the
  device per step (a sync the trainer's own finiteness check makes anyway).

Conventions shared with :class:`~declip_fast.losses.clip.ClipLoss`: ``logit_scale`` is the
multiplier itself (exp of the learned parameter, as OpenCLIP passes it), and image features are
used as given (the model normalizes them). Text views ARE normalized here, because the lookup is
a cosine search and the queue stores unit rows; they receive no gradient from this loss.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from declip_fast import kernels
from declip_fast.losses.clip import as_scalar, autocast_inputs


def _normalized(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Detached unit rows in ``dtype``; the norm is taken in fp32 (fp64 stays fp64) so 16-bit
    inputs do not lose the normalization to rounding before the cast."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.normalize(x.detach().to(compute), dim=-1).to(dtype)


def _world(group) -> int:
    """World size of ``group``, 1 when torch.distributed is not in use (a host-side query)."""
    from declip_fast.distributed import env

    return env.world_size(group)


class FeatureQueue(nn.Module):
    """FIFO ring buffer of L2-normalized, detached feature rows: ``size`` rows of ``dim``.

    The rows are a registered buffer (they move with ``.to()`` and are saved in the state dict);
    the write pointer and fill count are Python ints saved as extra state, so ``len(queue)``
    never reads device memory. While not yet full the filled rows are ``rows[:len(queue)]``;
    once full, every row is valid and ``rows[ptr:]`` then ``rows[:ptr]`` is oldest-first.
    Note that, like other containers, an empty queue is falsy: test ``queue is None``, not
    ``not queue``.
    """

    rows: torch.Tensor  # the registered buffer

    def __init__(self, size: int, dim: int, device=None, dtype=None):
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FeatureQueue {name} must be an int >= 1, got {value!r}")
        dtype = torch.float32 if dtype is None else dtype
        if not dtype.is_floating_point:
            raise ValueError(f"FeatureQueue dtype must be floating point, got {dtype}")
        # Zeros, not empty: the state dict of a fresh queue is deterministic.
        self.register_buffer("rows", torch.zeros(size, dim, device=device, dtype=dtype))
        self._ptr = 0
        self._count = 0

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    def __len__(self) -> int:
        return self._count

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, filled={self._count}, dtype={self.rows.dtype}"

    def check(self, features: torch.Tensor, name: str = "features") -> None:
        """Raise ValueError naming the problem when ``features`` cannot go into this queue."""
        if not isinstance(features, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(features.shape)}")
        if features.shape[0] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(features.shape)}")
        if features.shape[1] != self.dim:
            raise ValueError(f"{name} have dim {features.shape[1]}, the queue holds dim {self.dim}")
        if not features.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {features.dtype}")
        if features.device != self.rows.device:
            raise ValueError(
                f"{name} on {features.device} but the queue on {self.rows.device}: "
                "move the queue with .to(device) (it is never copied implicitly)"
            )

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, gather: bool = False, group=None, assume_finite: bool = False) -> bool:
        """Append ``features`` [B, dim] (normalized, detached, in the queue's dtype); returns
        False, changing nothing, when a value (of any rank's rows, with ``gather``) is not finite.

        With ``gather=True`` and a distributed world of more than one rank, every rank's batch
        is all-gathered first (one collective) and the global batch is enqueued in rank order,
        so queues stay identical across ranks. A batch longer than the queue keeps its last
        ``size`` rows.
        """
        self.check(features)
        rows = _normalized(features, self.rows.dtype)
        if gather and _world(group) > 1:
            from declip_fast.distributed.collectives import all_gather_no_grad

            rows = all_gather_no_grad(rows, group)
        if not assume_finite and not bool(torch.isfinite(rows).all()):  # a host sync
            return False
        self._write(rows)
        return True

    def _write(self, rows: torch.Tensor) -> None:
        n, size = rows.shape[0], self.size
        if n >= size:
            self.rows.copy_(rows[n - size :])
            self._ptr, self._count = 0, size
            return
        first = min(n, size - self._ptr)
        self.rows[self._ptr : self._ptr + first] = rows[:first]
        self.rows[: n - first] = rows[first:]
        self._ptr = (self._ptr + n) % size
        self._count = min(size, self._count + n)

    def features(self) -> torch.Tensor:
        """The filled rows, oldest first (a copy: later enqueues do not change it)."""
        if self._count < self.size:
            return self.rows[: self._count].clone()
        return torch.cat([self.rows[self._ptr :], self.rows[: self._ptr]])

    def bank(self) -> tuple[torch.Tensor, int]:
        """(raw buffer, valid rows) for a lookup: rows ``[0, valid)`` are filled. Row order is
        the ring's, not the age order, which a nearest-neighbour search does not care about."""
        return self.rows, self._count

    def get_extra_state(self):
        return {"ptr": self._ptr, "count": self._count}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or set(state) != {"ptr", "count"}:
            raise ValueError(f"FeatureQueue state must be a dict with ptr and count, got {state!r}")
        ptr, count = int(state["ptr"]), int(state["count"])
        if not (0 <= count <= self.size and 0 <= ptr < self.size):
            raise ValueError(f"FeatureQueue state ptr={ptr}, count={count} is out of range for size {self.size}")
        if count < self.size and ptr != count:
            raise ValueError(f"FeatureQueue state ptr={ptr} must equal count={count} until the queue is full")
        self._ptr, self._count = ptr, count

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "rows")
        if saved is not None and tuple(saved.shape) != tuple(self.rows.shape):
            raise ValueError(
                f"checkpoint queue has shape {tuple(saved.shape)} (size, dim), this queue "
                f"{tuple(self.rows.shape)}: build the queue with the saved size and dim"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ----------------------------------------------------------------------------- lookup dispatch


def nearest(queries: torch.Tensor, bank, valid: int | None = None, impl: str = "auto"):
    """Top-1 inner-product neighbour of each query in ``bank[:valid]`` (or in a FeatureQueue).

    Returns (scores float32 [B], indices int64 [B]); ties resolve to the lowest index. Under
    autocast, queries and bank are cast to the autocast dtype (:func:`autocast_inputs`), as the
    matmul of a dense search would be: an fp32 queue serves 16-bit queries, and the fused
    lookup reads 16-bit rows. The scores stay float32.
    """
    if isinstance(bank, FeatureQueue):
        bank, valid = bank.bank()
    (queries, bank), _ = autocast_inputs(queries, bank)
    return kernels.nearest(queries, bank, valid, impl=impl)


# ----------------------------------------------------------------------------- the loss


def check_views(image_views, text_views) -> tuple[int, int]:
    """Raise ValueError naming the problem unless every view is one [B, D] shape, floating
    dtype and device; returns (B, D)."""
    for name, views in (("image_views", image_views), ("text_views", text_views)):
        if not isinstance(views, (list, tuple)) or len(views) == 0:
            raise ValueError(f"{name} must be a non-empty list of [batch, dim] tensors, got {views!r:.80}")
    named = [(f"image_views[{i}]", v) for i, v in enumerate(image_views)]
    named += [(f"text_views[{i}]", v) for i, v in enumerate(text_views)]
    first_name, first = named[0]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or 0 in t.shape:
            raise ValueError(f"{name} must be a non-empty 2-D [batch, dim] tensor, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        for what, a, b in (
            ("shape", t.shape, first.shape),
            ("device", t.device, first.device),
            ("dtype", t.dtype, first.dtype),
        ):
            if a != b:
                raise ValueError(f"{name} has {what} {a} but {first_name} has {b}: all views must agree")
    return first.shape[0], first.shape[1]


class NNSLoss(nn.Module):
    """DeCLIP's nearest-neighbour supervision loss over a :class:`FeatureQueue`.

    ``forward`` returns ``None`` (no loss, not a zero loss) until the queue holds one global
    batch (B * world_size rows, or is full if smaller), and still enqueues: a lookup in an
    empty queue has nothing to find. The trainer skips the term on those steps.

    The queue is built from ``dim``/``device``/``dtype`` when ``dim`` is given, so a checkpoint
    can be loaded before the first step. With ``dim=None`` it is built on the first forward
    from the text features' dim, device and dtype (or loaded from a state dict, which then
    fixes them). A queue on another device than the features is moved to them once.
    """

    queue: FeatureQueue | None  # a submodule (add_module), None until built

    def __init__(
        self,
        queue_size: int = 65536,
        dim: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        impl: str = "auto",
        group=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        kernels.check_impl(impl)
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an int >= 1, got {queue_size!r}")
        self.queue_size, self.rank, self.world_size = queue_size, rank, world_size
        self.impl, self.group, self._dtype = impl, group, dtype
        queue = None if dim is None else FeatureQueue(queue_size, dim, device, dtype)
        self.add_module("queue", queue)
        self._defer, self._pending = False, None

    def forward(self, image_views, text_views, logit_scale, enqueue=None):
        """Loss over every (image view, text view) pair against the neighbours found in the
        queue *before* this step's enqueue, or ``None`` while the queue is not ready.

        ``enqueue``: ``None``/``True`` enqueues ``text_views[0]``, one row per caption, so the
        queue spans queue_size / N past steps (enqueueing every view would store near-duplicates
        of each caption and halve that history); a tensor enqueues that instead (e.g. another
        view; with world_size > 1 every rank must pass the same number of rows, as they are
        all-gathered); ``False`` skips the update. Rows with a non-finite value are not enqueued
        and the returned loss is NaN (module docstring).
        """
        b, d = check_views(image_views, text_views)
        scale = as_scalar("logit_scale", logit_scale, image_views[0])
        to_enqueue = self._to_enqueue(enqueue, text_views[0])
        queue = self._queue_for(text_views[0])
        if to_enqueue is not None:
            queue.check(to_enqueue, "enqueue")
        ready = len(queue) >= min(b * self.world_size, queue.size)
        loss = self._loss(queue, image_views, text_views, scale) if ready else None
        if to_enqueue is not None and self._defer:
            self._pending = to_enqueue.detach()
        elif to_enqueue is not None and not queue.enqueue(to_enqueue, gather=self.world_size > 1, group=self.group):
            nan = torch.full((), float("nan"), device=image_views[0].device)
            loss = nan if loss is None else loss + nan
        return loss

    def defer_enqueue(self, on: bool = True) -> None:
        """With ``on``, each forward holds its rows back until :meth:`commit`: a trainer that
        checks a whole step once (one host sync, :meth:`pending_finite` folded into it) enqueues
        only the rows of the steps it applies. Off (the default) forward enqueues at once."""
        self._defer, self._pending = on, None

    def pending_finite(self) -> torch.Tensor | None:
        """Whether the held rows are all finite, as a 0-d bool tensor on their device (no host
        sync); None when nothing is held."""
        return None if self._pending is None else torch.isfinite(self._pending).all()

    def commit(self, keep: bool) -> None:
        """Enqueue the held rows when ``keep`` (the caller checked :meth:`pending_finite` on
        every rank: the rows are not checked again), else drop them."""
        pending, self._pending = self._pending, None
        if keep and pending is not None:
            self._queue_for(pending).enqueue(pending, gather=self.world_size > 1, group=self.group, assume_finite=True)

    @staticmethod
    def _to_enqueue(enqueue, default: torch.Tensor):
        if enqueue is None or enqueue is True:
            return default
        if enqueue is False:
            return None
        if not isinstance(enqueue, torch.Tensor):
            raise ValueError(f"enqueue must be None, True, False or a tensor, got {type(enqueue).__name__}")
        return enqueue

    def _queue_for(self, text: torch.Tensor) -> FeatureQueue:
        if self.queue is None:
            dtype = text.dtype if self._dtype is None else self._dtype
            self.queue = FeatureQueue(self.queue_size, text.shape[1], text.device, dtype)
        if self.queue.dim != text.shape[1]:
            raise ValueError(f"features have dim {text.shape[1]}, the NNS queue holds dim {self.queue.dim}")
        if self.queue.rows.device != text.device:
            self.queue.to(text.device)
        if self.world_size > 1:
            self._check_group()
        return self.queue

    def _check_group(self) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"NNSLoss(world_size={self.world_size}) needs an initialized torch.distributed "
                "process group (torchrun + dist.init_process_group)"
            )
        if dist.get_world_size(self.group) != self.world_size:
            raise ValueError(
                f"NNSLoss(world_size={self.world_size}) but the process group has "
                f"{dist.get_world_size(self.group)} ranks"
            )

    def _loss(self, queue, image_views, text_views, scale) -> torch.Tensor:
        b = image_views[0].shape[0]
        # The contrastive losses' mixed-precision rule: 16-bit in, float32 out under autocast.
        image_views, out_dtype = autocast_inputs(*image_views)
        impl = kernels.resolve_impl(self.impl, image_views[0])
        offset = self.rank * b
        total = None
        for keys in self._neighbour_keys(queue, text_views, image_views[0].dtype):
            for image in image_views:
                term = kernels.clip_loss(image, keys, scale, mode="rows", offset=offset, out_dtype=out_dtype, impl=impl)
                total = term if total is None else total + term
        return cast(torch.Tensor, total) / (len(image_views) * len(text_views))

    def _neighbour_keys(self, queue, text_views, dtype) -> list[torch.Tensor]:
        """Per text view, the [N, D] neighbour rows of all ranks in rank order (constants).

        All views are searched in one lookup and gathered in one collective; indexing the
        buffer copies the rows, so the enqueue that follows cannot change saved keys.
        """
        v, b = len(text_views), text_views[0].shape[0]
        queries = torch.cat([_normalized(t, queue.rows.dtype) for t in text_views])
        bank, valid = queue.bank()
        _, index = nearest(queries, bank, valid, self.impl)
        found = bank[index].to(dtype)  # [V * B, D], in the loss's dtype before any gather
        if self.world_size > 1:
            from declip_fast.distributed.collectives import all_gather_no_grad

            found = all_gather_no_grad(found, self.group)  # [W * V * B, D], rank-major
        found = found.view(self.world_size, v, b, -1)
        return [found[:, i].reshape(self.world_size * b, -1) for i in range(v)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A lazily built queue does not exist yet: build it from the checkpoint's rows so that
        # loading before the first step restores the queue instead of rejecting its keys.
        saved = state_dict.get(prefix + "queue.rows")
        if self.queue is None and saved is not None:
            if saved.dim() != 2 or saved.shape[0] != self.queue_size:
                raise ValueError(
                    f"checkpoint queue has shape {tuple(saved.shape)}, this loss queue_size {self.queue_size}"
                )
            dtype = saved.dtype if self._dtype is None else self._dtype
            self.queue = FeatureQueue(self.queue_size, saved.shape[1], saved.device, dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
