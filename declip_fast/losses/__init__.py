"""Losses users import: drop-ins for OpenCLIP's, backed by declip_fast.kernels."""

from declip_fast.losses.clip import ClipLoss

__all__ = ["ClipLoss"]
