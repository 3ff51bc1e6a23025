"""Plain-torch references for the kernels, and the CPU / no-Triton fallback.

One module per op, each re-exported here under the names callers use (``declip_fast.kernels``'
functional API, the tests, the benchmarks):

- ``reference_contrastive``: the contrastive loss without the N x N logits, symmetric
  (:func:`clip_loss`) and one-direction (:func:`clip_loss_rows`), and the textbook dense form
  (:func:`clip_loss_dense`, for tests);
- ``reference_gathered``: the gathered mode (:func:`clip_loss_gathered`), this rank's share of the
  global-batch loss, built on the symmetric loss's tile walk;
- ``reference_lookup``: the top-1 inner-product search (:func:`nn_lookup`, :func:`check_lookup`);
- ``reference_common``: what they share (compute dtype, autocast off).

The tuning constants are re-exported for reading; a test that patches one patches it in its home
module (the functions read it there).
"""

from __future__ import annotations

from declip_fast.kernels.reference_contrastive import (  # noqa: F401  (re-exported)
    MAX_COL_BLOCK,
    TILE_ELEMENTS,
    clip_loss,
    clip_loss_dense,
    clip_loss_rows,
)
from declip_fast.kernels.reference_gathered import clip_loss_gathered  # noqa: F401
from declip_fast.kernels.reference_lookup import (  # noqa: F401
    LOOKUP_CHUNK_ELEMENTS,
    MIN_LOOKUP_CHUNK,
    check_lookup,
    nn_lookup,
)
