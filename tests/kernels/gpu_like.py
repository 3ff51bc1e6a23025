"""Make the Triton interpreter behave more like a GPU, for CPU tests (test-only monkeypatches).

The interpreter runs a launch's programs one after the other in one fixed order (x, then y,
then z), and its ``tl.dot`` multiplies bf16 operands as raw uint16 bit patterns. A GPU runs
programs in no fixed order and multiplies bf16 as numbers. Two patches close the gap:

- :func:`program_order` re-runs every launch's programs in another order ("reversed", or
  "shuffled" with a seed). A kernel whose outputs depend on the order (fp32 atomics, programs
  reading what another program wrote) gives different bits; a correct one gives identical bits.
  It works without copying the interpreter's loop: each program call is recorded as the
  interpreter issues it, and when the last one is issued they all run, in the chosen order,
  before the interpreter copies results back to the tensors.
- :func:`decoded_bf16_dots` decodes bf16 operands to fp32 before the interpreter's dot (exact:
  bf16 is the top half of an fp32), so bf16 kernels can be checked against float64 on the CPU.

Both patch Triton objects for the duration of a ``with`` block only; nothing is patched at import.
"""

from __future__ import annotations

import contextlib
import inspect
import random

import numpy as np

ORDERS = ("natural", "reversed", "shuffled")


def _interpreter():
    from triton.runtime import interpreter

    return interpreter


def _permute(calls: list, order: str, seed: int) -> list:
    if order == "natural":
        return calls
    if order == "reversed":
        return calls[::-1]
    if order == "shuffled":
        shuffled = list(calls)
        random.Random(seed).shuffle(shuffled)
        return shuffled
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


class _Recorder:
    """Stands in for the kernel function during one launch: records each program call and runs
    them all, permuted, when the last is issued. It carries the kernel's name, signature and
    globals, which the interpreter reads (to bind arguments, and to find the ``triton.language``
    module it patches)."""

    def __init__(self, fn, builder, order, seed):
        self.fn, self.builder, self.order, self.seed = fn, builder, order, seed
        self.__globals__, self.__name__ = fn.__globals__, fn.__name__
        self.__signature__ = inspect.signature(fn)
        self.calls = []

    def __call__(self, **args):
        self.calls.append((self.builder.grid_idx, args))
        if len(self.calls) == int(np.prod(self.builder.grid_dim)):
            for idx, a in _permute(self.calls, self.order, self.seed):
                self.builder.set_grid_idx(*idx)
                self.fn(**a)


@contextlib.contextmanager
def program_order(order: str, seed: int = 0):
    """Run every interpreted launch inside the block with its programs in ``order``."""
    interp = _interpreter()
    builder = interp.interpreter_builder
    original_call = interp.GridExecutor.__call__
    launches = {"count": 0}

    def call(self, *args, **kwargs):
        launches["count"] += 1
        real_fn = self.fn
        self.fn = _Recorder(real_fn, builder, order, seed + launches["count"])
        try:
            return original_call(self, *args, **kwargs)
        finally:
            self.fn = real_fn

    interp.GridExecutor.__call__ = call
    try:
        yield launches
    finally:
        interp.GridExecutor.__call__ = original_call


def _decoded(handle):
    interp = _interpreter()
    import triton.language as tl

    if handle.dtype != tl.bfloat16:
        return handle
    as_fp32 = (handle.data.astype(np.uint32) << 16).view(np.float32)
    return interp.TensorHandle(as_fp32, tl.float32)


@contextlib.contextmanager
def decoded_bf16_dots():
    """Inside the block, the interpreter's ``tl.dot`` reads bf16 operands as numbers."""
    interp = _interpreter()
    original = interp.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, _decoded(a), _decoded(b), d, input_precision, max_num_imprecise_acc)

    interp.InterpreterBuilder.create_dot = create_dot
    try:
        yield
    finally:
        interp.InterpreterBuilder.create_dot = original
