"""What the Triton kernels share: the interpreter switch, input classes, autotune config lists
pruned per input class, and the shape buckets of their autotune keys."""

from __future__ import annotations

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


def tuning(table: dict, pointer: str):
    """(every config of ``table``, autotune's pruning hook keeping the configs of the call's input
    class, read from the dtype of the argument named ``pointer``).

    ``table`` maps an input class to [(meta-parameters, launch options)]; an interpreter table
    has a single entry used for every dtype.
    """
    by_class = {k: [triton.Config(meta, **opts) for meta, opts in v] for k, v in table.items()}

    def prune(configs, named_args, **kwargs):
        if len(by_class) == 1:
            return next(iter(by_class.values()))
        return by_class[input_class(named_args[pointer].dtype)]

    return [c for v in by_class.values() for c in v], {"early_config_prune": prune}


def bucket(n: int) -> int:
    """Autotune key bucket: the next power of two, so nearby sizes share a tuning."""
    return 1 << max(0, (n - 1).bit_length())
