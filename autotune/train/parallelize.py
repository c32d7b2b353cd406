"""Apply parallelism to the decoder, one small function per kind, in this order:

1. ``split_pipeline_stage``: keep this pipeline rank's layers (plus the embedding on the
   first stage and the head on the last);
2. ``apply_tp``: shard attention and MLP projections over the tp mesh (column-wise in,
   row-wise out), so each tp rank holds heads / tp query heads and kv_heads / tp kv heads;
3. activation checkpointing is applied inside the decoder's forward (``checkpoint_layers``);
4. ``apply_data_parallel``: FSDP2 over the dp mesh: ``replicate`` for zero stage 0,
   ``fully_shard`` per block and at the root for stages 1-3 (see ParallelConfig).

The same code runs on CUDA (NCCL) and on CPU ranks (gloo).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from autotune.train.model import Decoder

__all__ = ["apply_data_parallel", "apply_tp", "parallelize", "split_pipeline_stage"]


def split_pipeline_stage(model: Decoder, *, stage: int, stages: int) -> Decoder:
    """Drop what this stage does not run. Layers split evenly (the config rules make pp
    divide the layer count)."""
    per = len(model.layers) // stages
    keep = {str(i) for i in range(stage * per, (stage + 1) * per)}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if stage != 0:
        model.tok_embeddings = None
    if stage != stages - 1:
        model.norm = None
        model.output = None
    return model


def apply_tp(model: Decoder, *, tp_mesh: Any) -> None:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {
        "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, plan)


def apply_data_parallel(model: Decoder, *, dp_mesh: Any, zero_stage: int) -> None:
    if zero_stage == 0:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        replicate(model, mesh=dp_mesh)
        return
    from torch.distributed.fsdp import fully_shard

    reshard = zero_stage == 3
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
    # The root keeps the embedding and head; it is resharded last anyway.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard)


def parallelize(model: nn.Module, rc, ctx) -> nn.Module:
    """Steps 2-4 for this rank's coordinates in ``ctx``; ``model`` is the whole decoder, or
    a pipeline stage already cut by ``split_pipeline_stage`` (step 1)."""
    if ctx.tp > 1:
        apply_tp(model, tp_mesh=ctx.submesh("tp"))
    if ctx.dp > 1:
        apply_data_parallel(model, dp_mesh=ctx.submesh("dp"), zero_stage=rc.parallel.zero_stage)
    return model
