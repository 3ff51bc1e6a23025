"""Deprecation alias, kept for one release: the checkpoint manifest moved to
:mod:`declip_fast.distributed.manifest` (``eval`` reads checkpoints too and must not import
``train``). Import it from there."""

from declip_fast.distributed.manifest import (  # noqa: F401  (re-exported)
    _UNLISTED,
    MANIFEST,
    CheckpointDamaged,
    manifest_bytes,
    sha256_of,
    verify,
)
