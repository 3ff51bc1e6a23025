"""Initialisation helpers shared by the towers."""

from __future__ import annotations

import torch
from torch import nn


def normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """``nn.init.normal_(tensor, 0, std)``, skipped on the meta device.

    A meta tensor has no values to initialise, and torch's meta ``normal_`` goes through
    ``torch._refs``, whose first use imports torch._dynamo and sympy (~5 s): building a model on
    meta must stay instant. ``DeCLIP.init_weights()`` initialises for real after ``to_empty``.
    """
    if tensor.is_meta:
        return tensor
    return nn.init.normal_(tensor, std=std)
