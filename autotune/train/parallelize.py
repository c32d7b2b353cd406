"""Build the decoder for one rank and apply parallelism, one small function per kind, in
this order (``build_model`` runs them all):

0. the whole decoder is built on the meta device: no memory, no initialisation;
1. ``split_pipeline_stage``: keep this pipeline rank's layers (plus the embedding on the
   first stage and the head on the last);
2. ``apply_tp``: shard attention and MLP projections over the tp mesh (column-wise in,
   row-wise out), so each tp rank holds heads / tp query heads and kv_heads / tp kv heads;
3. activation checkpointing is applied inside the decoder's forward (``checkpoint_layers``);
4. ``apply_compile``: ``torch.compile`` each block (``compile: blocks``);
5. ``apply_data_parallel``: FSDP2 over the dp mesh: ``replicate`` for zero stage 0,
   ``fully_shard`` per block and at the root for stages 1-3 (see ParallelConfig), with
   ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` under bf16: fp32 master
   weights and optimizer state, bf16 gathers and compute, fp32 gradient reduction;
6. ``to_empty`` on the rank's device, then ``Decoder.reset_parameters`` on the shards.

No rank ever holds the whole model unless its layout gives it the whole model. The same
code runs on CUDA (NCCL), on CPU ranks (gloo), and under ``FakeTensorMode`` with torch's
fake process group (a real-size model planned on a machine without its devices).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autotune.config import ModelDims, RunConfig
from autotune.config._runconfig import PADDED_POLICIES
from autotune.train.model import Decoder, keep_attention_out_of_graph

__all__ = ["apply_compile", "apply_data_parallel", "apply_tp", "build_model", "parallelize",
           "split_pipeline_stage"]


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


def apply_compile(model: nn.Module, *, dynamic: bool) -> None:
    """Compile every transformer block in place (before FSDP wraps it, as torchtitan does:
    FSDP's hooks then run around the compiled forward). Attention is excluded from the
    graph by the block itself (see ``autotune.train.model``)."""
    for block in model.layers.values():
        keep_attention_out_of_graph(block.attention)
        block.compile(dynamic=dynamic)


def apply_data_parallel(model: Decoder, *, dp_mesh: Any, zero_stage: int,
                        param_dtype: torch.dtype | None = None) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # cast_forward_inputs off: a block's activations arrive in bf16 already (the embedding
    # and every block compute in it), while the rotary tables (cos and sin, block inputs too)
    # should stay fp32: rounded to bf16 they would skew every rotation by up to 0.4%.
    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                               cast_forward_inputs=False)
          if param_dtype is not None else MixedPrecisionPolicy())
    if zero_stage == 0:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        replicate(model, mesh=dp_mesh, mp_policy=mp)
        return
    from torch.distributed.fsdp import fully_shard

    reshard = zero_stage == 3
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)
    # The root keeps the embedding and head; it is resharded last anyway.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)


def parallelize(model: nn.Module, rc: RunConfig, ctx: Any) -> nn.Module:
    """Steps 2-5 for this rank's coordinates in ``ctx``; ``model`` is the whole decoder, or
    a pipeline stage already cut by ``split_pipeline_stage`` (step 1)."""
    if ctx.tp > 1:
        apply_tp(model, tp_mesh=ctx.submesh("tp"))
    if rc.compile == "blocks":
        apply_compile(model, dynamic=rc.schedule.policy in PADDED_POLICIES)
    if ctx.replicas > 1:
        apply_data_parallel(model, dp_mesh=ctx.replica_mesh(), zero_stage=rc.parallel.zero_stage,
                            param_dtype=torch.bfloat16 if rc.precision.dtype == "bf16" else None)
    return model


def build_model(rc: RunConfig, ctx: Any, dims: ModelDims | None = None
                ) -> tuple[Decoder, nn.Module]:
    """This rank's decoder (steps 0-6) and the module to train: the decoder itself, or its
    pipeline stage wrapped for the schedule."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from autotune.train.pipeline import StageModule

    dims = dims or rc.workload.model.resolve()
    # Steps 0-5 allocate nothing (meta tensors); under FakeTensorMode they run outside it,
    # since the device mesh's own bookkeeping (index tensors, nonzero) must stay real.
    with unset_fake_temporarily(), torch.device("meta"):
        decoder = Decoder(dims, attention=rc.kernels.attention, loss=rc.kernels.loss,
                          norm=rc.kernels.norm,
                          checkpoint_layers=rc.checkpointing.checkpointed_layers(dims.layers))
    model: nn.Module = decoder
    with unset_fake_temporarily():
        if ctx.pp > 1:
            split_pipeline_stage(decoder, stage=ctx.pp_rank, stages=ctx.pp)
            model = StageModule(decoder)
        parallelize(model, rc, ctx)
    model.to_empty(device=ctx.device)
    decoder.reset_parameters(rc.seed)
    return decoder, model
