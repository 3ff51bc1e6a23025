"""Deprecation alias, kept for one release: the fused linear cross-entropy is a kernel-level op now
(the MLM head in ``models`` calls it, and ``models`` must not import ``losses``). Call
:func:`declip_fast.kernels.linear_cross_entropy` (the functional API, with ``impl``, the same
signature as here); its torch implementation and ``IGNORE_INDEX`` are in
:mod:`declip_fast.kernels.linear_ce`. Import them from there."""

from declip_fast.kernels import linear_cross_entropy  # noqa: F401  (re-exported)
from declip_fast.kernels.linear_ce import (  # noqa: F401  (re-exported)
    IGNORE_INDEX,
    _check_range,
    _forward,
    _LinearCrossEntropy,
    _row_block,
    default_tile,
)
