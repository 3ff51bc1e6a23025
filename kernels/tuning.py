"""What the Triton kernels share: the interpreter switch, input classes, autotune config lists
pruned per input class, and the shape buckets of their autotune keys."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton


def interpreting() -> bool:
    """True under the Triton interpreter (CPU tensors; TRITON_INTERPRET=1 set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def input_class(dtype: torch.dtype) -> str:
    """fp32 inputs need their own tilings (three TF32 products per dot); 16-bit ones share."""
    return "fp32" if dtype == torch.float32 else "16-bit"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: fp32 inputs take three TF32 tensor-core products per dot
    (about fp32 accuracy; plain IEEE fp32 dots run on FMA units and spill at these tiles);
    16-bit inputs ignore the setting."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def tuning(table: dict, pointer: str, adjust=None):
    """(every config of ``table``, autotune's pruning hook keeping the configs of the call's input
    class, read from the dtype of the argument named ``pointer``).

    ``table`` maps an input class to [(meta-parameters, launch options)]; an interpreter table
    has a single entry used for every dtype. ``adjust(meta, named_args)``, if given, may shrink
    a config's meta-parameters to the call (e.g. a D-chunk no wider than D) or return None to
    drop the config for this call; configs that become equal are tried once.
    """
    by_class = {k: [triton.Config(meta, **opts) for meta, opts in v] for k, v in table.items()}

    def prune(configs, named_args, **kwargs):
        if len(by_class) == 1:
            kept = next(iter(by_class.values()))
        else:
            kept = by_class[input_class(named_args[pointer].dtype)]
        if adjust is None:
            return kept
        out, seen = [], set()
        for c in kept:
            meta = adjust(dict(c.kwargs), named_args)
            if meta is None:
                continue
            key = (tuple(sorted(meta.items())), c.num_warps, c.num_stages, c.maxnreg)
            if key not in seen:
                seen.add(key)
                out.append(triton.Config(meta, num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg))
        return out

    return [c for v in by_class.values() for c in v], {"early_config_prune": prune}


def bucket(n: int) -> int:
    """Autotune key bucket: the next power of two, so nearby sizes share a tuning."""
    return 1 << max(0, (n - 1).bit_length())


# Programs the interpreter plans for: a small "GPU" of 4 slots, so that CPU tests see programs
# that walk several tiles, split reductions and partial merges.
INTERPRETER_SLOTS = 4


def concurrent_programs(device: torch.device, per_sm: int = 1) -> int:
    """Programs that run at once: streaming multiprocessors x ``per_sm`` on a GPU, or
    INTERPRETER_SLOTS under the interpreter."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_SLOTS
    return torch.cuda.get_device_properties(device).multi_processor_count * per_sm


def launch_device(device: torch.device):
    """Context for a launch on ``device``: Triton launches on the *current* CUDA device, so a
    tensor on cuda:1 while cuda:0 is current needs this guard (a no-op for CPU tensors)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=4096)
def plan_rectangles(tiles_r: int, tiles_c: int, slots: int, max_per_axis: int) -> tuple[int, int]:
    """(P_r, P_c): cut a tiles_r x tiles_c grid of tiles into P_r x P_c rectangles of balanced
    sizes (they differ by at most one tile per axis), one program each, minimising the
    estimated time ``waves x tiles of the largest rectangle`` with ``slots`` programs running
    at once; ties go to fewer partial statistics (P_r + P_c). Never more rectangles per axis
    than tiles, so none is empty."""
    best = None
    for p_r in range(1, min(tiles_r, max_per_axis) + 1):
        for p_c in range(1, min(tiles_c, max_per_axis) + 1):
            waves = -(-p_r * p_c // slots)
            work = -(-tiles_r // p_r) * -(-tiles_c // p_c)
            key = (waves * work, p_r + p_c, p_r)
            if best is None or key < best[0]:
                best = (key, (p_r, p_c))
    return best[1]


def plan_splits(owner_tiles: int, other_tiles: int, slots: int, max_splits: int) -> int:
    """Ranges the reduction axis is cut into when ``owner_tiles`` programs alone cannot fill
    ``slots``: enough for about two waves, never more than the axis has tiles."""
    want = -(-2 * slots // owner_tiles)
    return max(1, min(want, other_tiles, max_splits))
