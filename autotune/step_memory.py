"""The memory features of a config's units of work, counted as the trainer holds them: the
analytic count for CPU configs, and for GPU configs the counts ``autotune memory`` traces
(FSDP2's mixed precision, pipeline stages, FlashAttention keeping no scores). The memory
model (``cost_models.step.MemoryModel``) turns them into bytes."""

from __future__ import annotations

import numpy as np

from autotune.config import ModelDims, RunConfig
from autotune.step_tables import PlanTable, heaviest_steps
from cost_models.step import MEMORY_FEATURES, activation_bytes_per_token
from kernels.linear_ce import workspace_bytes

__all__ = ["gpu_memory_units", "loss_chunk", "memory_units"]

# Bytes one token keeps for backward in one decoder block on GPUs, per unit of the hidden
# width (never split by tp) and of the q, kv and ffn widths (split by tp): counted with
# saved-tensor hooks on the reference block for each way the trainer runs bf16 (FSDP2's
# mixed precision; autocast over fp32 parameters when dp = 1) and for fp32. The norms keep
# float32 statistics and inputs, rotary embeddings a float32 copy of q and k.
_SAVED_PER_TOKEN = {"mixed": (16, 4, 4, 8), "autocast": (22, 4, 4, 8), "fp32": (20, 8, 8, 16)}


def loss_chunk(rc: RunConfig) -> int | None:
    """Tokens per chunk of the fused loss; None for the full loss (all logits at once)."""
    if rc.kernels.loss != "fused":
        return None
    from kernels.registry import KERNELS

    return rc.kernels.configs.get("linear_ce", KERNELS["linear_ce"].default)["chunk_tokens"]


def memory_units(rc: RunConfig, dims: ModelDims, plans: PlanTable, layers: int, ckpt: int,
             act_bytes: int) -> np.ndarray:
    """Memory features of every unit in the steps ``autotune measure`` would replay for
    the peak (each rank's heaviest timed step), bytes by the analytic count."""
    p = rc.parallel
    tp = p.tp
    q, kv, ffn = dims.q_width // tp, dims.kv_width // tp, dims.ffn // tp
    per_token_layer = activation_bytes_per_token(dims.hidden, q, kv, ffn, act_bytes)
    params = dims.total_params() // (tp * p.pp)
    if p.zero_stage == 0:
        state, gathered = params * 4 * 4, 0.0
    else:
        state = params * 4 * 4 / (p.dp * p.cp)
        gathered = params * 4 if p.zero_stage < 3 else params * 4 * 2 / max(layers, 1)
    chunk = loss_chunk(rc)
    out = []
    for _, _, u in heaviest_steps(plans):
        act_t, pairs, widest, prefix, logit_t = u.T
        ones = np.ones(len(u))
        # The loss's workspace scaled so that full logits count T x V x 8 bytes as ever
        # (logits and their gradient; the fit's coefficient covers the rest), and the
        # fused loss its chunk and gradients on the same scale.
        logits = workspace_bytes(logit_t, dims.hidden, dims.vocab, chunk, act_bytes) * 2 / 3
        out.append(np.column_stack([
            state * ones, gathered * ones,
            act_t * (layers - ckpt) * per_token_layer,
            act_t * ckpt * dims.hidden * act_bytes,
            widest * per_token_layer * (1.0 if ckpt else 0.0),
            pairs * (dims.heads // tp) * (layers - ckpt + (1 if ckpt else 0)) * act_bytes,
            prefix * layers * 2 * kv * act_bytes,
            logits,
        ]))
    return np.vstack(out) if out else np.zeros((1, len(MEMORY_FEATURES)))

def gpu_memory_units(rc: RunConfig, dims: ModelDims, plans: PlanTable, layers: int,
                 ckpt: int) -> np.ndarray:
    """The memory features of GPU configs, counted as the trainer holds them on GPUs
    (and as ``autotune memory`` traces them): FSDP2's mixed precision where dp > 1 under
    bf16 (fp32 master shards, bf16 gathered parameters), autocast over fp32 parameters
    where dp = 1; the lm head and embedding never split by tp; FlashAttention keeps no
    score matrices. With pp > 1, one row per unit for the first stage (the embedding,
    1F1B's pp micro-batches in flight, GPipe's all) and for the last (the head and the
    logits), so the peak is the worse stage's."""
    p = rc.parallel
    tp, h = p.tp, dims.hidden
    replicas = p.dp * p.cp  # ranks holding the same parameters (cp ranks are replicas too)
    mode = "fp32" if rc.precision.dtype != "bf16" else ("mixed" if replicas > 1 else "autocast")
    ch, cq, ckv, cf = _SAVED_PER_TOKEN[mode]
    per_token = ch * h + (cq * dims.q_width + ckv * dims.kv_width + cf * dims.ffn) / tp
    residual = 2 if mode == "mixed" else 4  # a checkpointed layer's saved input
    compute_bytes = 4 if mode == "fp32" else 2  # gathered parameters, K/V state
    # outside the blocks: the embedding, the lm head (unless tied) and the final norm
    embed = dims.vocab * h
    head = 0 if dims.tie_embeddings else embed
    block = (dims.total_params() - embed - head - h) / dims.layers / tp
    last = head + h if p.pp > 1 else embed + head + h
    # (parameters this stage holds beyond its blocks, whether it computes the loss)
    stages = [(last, True)] if p.pp == 1 else [(embed, False), (last, True)]
    chunk = loss_chunk(rc)
    sharded = p.zero_stage >= 1 and replicas > 1
    per_step = replicas > 1 and p.reduce_per_step(rc.schedule.policy)
    out = []
    for s, r, u in heaviest_steps(plans):
        act_t, pairs, widest, prefix, logit_t = u.T
        n_mb = float(plans.micro_batches[s, r])
        for extra, has_loss in stages:
            local = layers * block + extra
            state = 16.0 * local / (replicas if sharded else 1)
            if mode == "autocast":  # bf16 copies of the weights, kept for backward
                gathered = 2.0 * local
            elif replicas == 1:
                gathered = 0.0
            elif p.zero_stage == 3:  # the root's parameters and one block in flight
                gathered = compute_bytes * (extra + block)
            elif mode == "mixed" or p.zero_stage in (1, 2):  # bf16 copies, or unsharded
                gathered = compute_bytes * local
            else:
                gathered = 0.0
            if per_step:  # gradients accumulated unsharded (fp32) until the step's sync
                gathered += 4.0 * local
            if p.pp == 1 or has_loss:
                flight = 1.0
            else:
                flight = n_mb if p.pp_schedule == "gpipe" else min(float(p.pp), n_mb)
            logits = (workspace_bytes(logit_t, h, dims.vocab, chunk, compute_bytes) * 2 / 3
                      if has_loss else np.zeros(len(u)))
            ones = np.ones(len(u))
            # torch's pipeline stage keeps a receive buffer and an input gradient (or an
            # output and its gradient) of every micro-batch of the step: tokens x
            # hidden, counted with the checkpointed inputs
            buffers = n_mb * act_t * h * 4.0 if p.pp > 1 else 0.0
            out.append(np.column_stack([
                state * ones, gathered * ones,
                flight * act_t * (layers - ckpt) * per_token,
                flight * act_t * ckpt * h * residual + buffers,
                widest * per_token * (1.0 if ckpt else 0.0),
                pairs * (dims.heads // tp) * (layers - ckpt + (1 if ckpt else 0)) * compute_bytes
                * (1.0 if rc.kernels.attention == "eager" else 0.0),
                prefix * layers * 2 * (dims.kv_width // tp) * compute_bytes,
                logits,
            ]))
    return np.vstack(out) if out else np.zeros((1, len(MEMORY_FEATURES)))
