"""Apply FSDP2 to a DeCLIP model from outside it, in the usual FSDP2 order: build ->
checkpointing -> compile -> fully_shard per block -> root (the root last, so it holds only the
parameters no block or head owns). The models never import torch.distributed.

``parallelize(model, mesh=None, precision="fp32", compile=False, checkpointing=False, shard=None)``,
for every world size (one process: the first two steps only):

- SimSiam's batch norms made global-batch ones (``declip_fast.distributed.batchnorm.convert``);

- activation checkpointing: the model's own per-block switch (``set_grad_checkpointing``);
- ``torch.compile`` per block (small graphs, compiled once, reused by every block of a tower);
- ``fully_shard`` on every block of both towers, on each head that exists (SimSiam projector and
  predictor, MLM head), then on the root (embeddings, norms, projections, logit_scale);
- bf16: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: compute in bf16,
  gradients reduced and kept in fp32, fp32 master weights in the optimizer.

Initialisation: the trainer builds the full model on its device from the run's seed on every
rank, then shards it (each rank keeps its slice of identical tensors), so N ranks start exactly
where one process starts. Building on the meta device and initialising after sharding
(``to_empty`` + ``init_weights``) saves that transient full copy, but DTensor's random ops only
reproduce the unsharded draw on CUDA; for the paper models (<= 150M parameters) the full copy
costs < 1 GB, so exactness wins.
"""

from __future__ import annotations

import torch
from torch import nn


def _policy(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "fp32":
        return MixedPrecisionPolicy()
    raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP unit: every tower block, then each built head."""
    units = list(model.blocks())
    for name in ("projector", "predictor", "mlm_head"):
        head = getattr(model, name, None)
        if head is not None:
            units.append(head)
    return units


def parallelize(
    model: nn.Module,
    mesh=None,
    precision: str = "fp32",
    compile: bool = False,
    checkpointing: bool = False,
    shard: bool | None = None,
) -> nn.Module:
    """Checkpointing, compile and (when ``shard``) global-batch norms and FSDP2 applied to
    ``model`` in place; returns it. ``shard`` None: shard when a mesh is given or a process group
    of more than one rank is up, so one call serves every world size (one process keeps its
    parameters whole; its bf16 comes from autocast, the caller's)."""
    from declip_fast.distributed import batchnorm, env

    if shard is None:
        shard = mesh is not None or env.world_size() > 1
    model.set_grad_checkpointing(checkpointing)
    if compile:
        for module in model.modules():  # parts that stay eager or change shape under compile
            before = getattr(module, "before_compile", None)
            if callable(before):
                before()
        for block in model.blocks():
            block.compile()
    if not shard:
        _policy(precision)  # the same check of ``precision`` either way
        return model
    from torch.distributed.fsdp import fully_shard

    batchnorm.convert(model)  # SimSiam's batch norms see the global batch
    policy = _policy(precision)
    units = shard_units(model)
    for i, unit in enumerate(units):
        # The last unit is gathered again right away by the root's backward: keep it unsharded.
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(units) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # OpenCLIP's encode_* methods (zero-shot evaluation) must gather the root's parameters too.
    from torch.distributed.fsdp import register_fsdp_forward_method

    for method in ("encode_image", "encode_text"):
        register_fsdp_forward_method(model, method)
    if getattr(model, "mlm_head", None) is not None:  # the fused MLM loss is a method of its unit
        register_fsdp_forward_method(model.mlm_head, "loss")
    return model
