"""What the plain-torch references (``reference_contrastive``, ``reference_gathered``,
``reference_lookup``) share: the dtype they compute in and autocast switched off."""

from __future__ import annotations

import contextlib

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(device_type: str):
    """Autocast off for this device type (which autocast may not know, as the meta device)."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
