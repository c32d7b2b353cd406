"""The trainer's GPU-scale paths, checked on this CPU.

- A llama3-70b RunConfig at world 64 (8 nodes x 8 GPUs: tp 8 x dp 8, ZeRO 3, bf16, the
  FlashAttention varlen kernel) is built on the meta device, parallelized and stepped once
  as rank 0 under ``FakeTensorMode`` with torch's fake process group: every shard, gradient
  and optimizer state has the size a hand count gives, the blocks compute in bf16 over fp32
  master weights, and the process stays far below the 280 GB an unsharded fp32 copy would
  take.
- ``compile: blocks`` trains the same losses as eager.
- A training step reads the device back a constant number of times, whatever the number of
  layers and micro-batches (each read-back is a host synchronization on a GPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from autotune.config import RunConfig
from autotune.train.trainer import Trainer

_FAKE_70B = r"""
import json, resource, sys
import torch
from autotune.config import RunConfig
from autotune.train.distributed import fake_parallel
from autotune.train.trainer import Trainer

rc = RunConfig.model_validate(json.loads(sys.argv[1]))
linear_dtypes = set()
with fake_parallel(rc) as ctx:
    trainer = Trainer(rc, ctx=ctx)
    for m in trainer.model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda m, a: linear_dtypes.add(str(m.weight.dtype)))
    pending = trainer.launch_step()
    from torch._subclasses.fake_tensor import FakeTensor
    params = trainer.params
    state = [s for p in params for s in trainer.optimizer.state[p].values()
             if isinstance(s, torch.Tensor) and s.ndim]
    out = {
        "local_numel": sum(p.to_local().numel() for p in params),
        "all_fake": all(isinstance(p.to_local(), FakeTensor) for p in params),
        "param_dtypes": sorted({str(p.dtype) for p in params}),
        # AdamW keeps state only for parameters that had a gradient when it stepped.
        "every_param_stepped": all(trainer.optimizer.state[p]["exp_avg"].to_local().shape
                                   == p.to_local().shape for p in params),
        "state_numel": sum(s.to_local().numel() for s in state),
        "state_dtypes": sorted({str(s.dtype) for s in state}),
        "linear_dtypes": sorted(linear_dtypes),
        "loss_fake": isinstance(pending.loss_sum, FakeTensor),
        "micro_batches": pending.host.micro_batches,
        "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
print(json.dumps(out))
"""


@pytest.mark.slow  # half a minute building 80 layers under fake tensors
def test_llama3_70b_at_world_64_builds_and_steps_under_fake_tensors() -> None:
    cfg = {
        "workload": {"model": {"preset": "llama3-70b"},
                     "data": {"preset": "longsft", "num_sequences": 2048, "max_len": 32768},
                     "hardware": {"device": "cuda", "devices_per_node": 8, "nodes": 8,
                                  "device_name": "H100-SXM"},
                     "budget": {"global_batch_tokens": 65536, "memory_cap_gb": 80}},
        "schedule": {"policy": "pack", "micro_batch_tokens": 4096},
        "parallel": {"dp": 8, "tp": 8, "zero_stage": 3},
        "checkpointing": {"policy": "selective", "fraction": 0.25},
        "kernels": {"attention": "varlen"},
        "precision": {"dtype": "bf16"},
    }
    # A process of its own: a fresh RSS figure, and no process group left in this one.
    proc = subprocess.run([sys.executable, "-c", _FAKE_70B, json.dumps(cfg)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    dims = RunConfig.model_validate(cfg).workload.model.resolve()
    # By hand: tp shards the block projections 8 ways and FSDP shards everything 8 ways
    # along dim 0 (padded up to a multiple of 8 rows); the embedding, head and norms are
    # not tensor-parallel.
    tp = dp = 8
    pad = lambda rows: -(-rows // dp)  # noqa: E731
    h, kv, q, ffn = dims.hidden, dims.kv_width, dims.q_width, dims.ffn
    block = (pad(q // tp) * h + 2 * pad(kv // tp) * h + pad(h) * (q // tp)
             + 2 * pad(ffn // tp) * h + pad(h) * (ffn // tp) + 2 * pad(h))
    expected = dims.layers * block + 2 * pad(dims.vocab) * h + pad(h)
    assert got["local_numel"] == expected
    # ~1/53 of 70.6 B (the embedding and head are sharded 8 ways, not 64): no full copy
    assert expected < dims.total_params() / 50
    assert got["all_fake"] and got["loss_fake"] and got["every_param_stepped"]
    assert got["param_dtypes"] == ["torch.float32"]  # fp32 master weights ...
    assert got["linear_dtypes"] == ["torch.bfloat16"]  # ... cast to bf16 for compute
    assert got["state_dtypes"] == ["torch.float32"] and got["state_numel"] == 2 * expected
    assert got["micro_batches"] >= 2
    assert got["rss_bytes"] < 4 * 2**30


BASE = {
    "workload": {"model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128,
                           "vocab": 96},
                 "data": {"preset": "longsft", "num_sequences": 400, "max_len": 256},
                 "budget": {"global_batch_tokens": 1024}},
}


def _config(policy: str, *, layers: int = 2, micro_batch_tokens: int = 128, **extra) -> RunConfig:
    cfg = json.loads(json.dumps(BASE))
    cfg["workload"]["model"]["layers"] = layers
    cfg["schedule"] = {"policy": policy, "micro_batch_tokens": micro_batch_tokens,
                       "chunk_size": min(64, micro_batch_tokens)}
    return RunConfig.model_validate(cfg | extra)


@pytest.mark.parametrize("policy", ["pack", "chunkflow"])
def test_compile_blocks_trains_the_same_losses_as_eager(policy: str) -> None:
    """Per-block torch.compile (inductor on this CPU) against eager, 3 steps. The compiled
    blocks fuse norms, rotary and SwiGLU, which may round differently: 1e-5 relative."""
    from torch._dynamo.utils import counters

    eager = Trainer(_config(policy))
    ref = [eager.step().loss for _ in range(3)]
    torch._dynamo.reset()  # compile afresh: a cached graph would not be counted
    counters.clear()
    compiled = Trainer(_config(policy, compile="blocks"))
    got = [compiled.step().loss for _ in range(3)]
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 2  # the blocks really ran compiled
    # Static shapes (micro-batches padded to the token budget) and the attention kept out
    # of the graph: a handful of graphs, not one per micro-batch layout.
    assert counters["stats"]["unique_graphs"] <= 6


_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


@contextmanager
def _count_host_reads() -> Iterator[Counter]:
    """Counts every read of a tensor's values back to the host (on a GPU, each one waits
    for the device), and every tensor built from a Python list (a copy to the device)."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _READS}
    make = torch.tensor

    def counted(name):  # noqa: ANN001, ANN202
        def call(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            counts[name] += 1
            return originals[name](self, *a, **k)
        return call

    def tensor(data, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if isinstance(data, (list, tuple)):
            counts["tensor(list)"] += 1
        return make(data, *a, **k)

    for name in _READS:
        setattr(torch.Tensor, name, counted(name))
    torch.tensor = tensor
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.tensor = make


@pytest.mark.parametrize("policy", ["pack", "chunkflow"])
def test_host_reads_per_step_do_not_grow_with_layers_or_micro_batches(policy: str) -> None:
    counts = {}
    for layers, mbt in ((1, 256), (4, 64)):
        trainer = Trainer(_config(policy, layers=layers, micro_batch_tokens=mbt))
        trainer.step()  # first-step set-up (optimizer state) aside
        with _count_host_reads() as reads:
            result = trainer.step()
        counts[(layers, mbt)] = (dict(reads), result.micro_batches)
    (small, few), (big, many) = counts.values()
    assert many > 2 * few  # the second config really runs more micro-batches, and layers
    assert small == big, counts
    assert sum(small.values()) <= 2, counts  # the loss and gradient norm, read once
