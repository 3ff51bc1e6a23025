"""Triton kernels and their plain-torch references (installed as declip_fast.kernels)."""
