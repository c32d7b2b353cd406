"""What only a CUDA machine can check, ready for the first person who has one:

    .venv/bin/python -m pytest tests/gpu -m gpu -q        # minutes on one node

- FlashAttention varlen (``kernels.attention: varlen``) and FlexAttention against plain math,
  forward and backward, for a pack and for a ChunkFlow chunk over its key/value prefix;
- a training step queues its work without one hidden host synchronization
  (``torch.cuda.set_sync_debug_mode("error")``), for pack and chunkflow;
- two ranks on NCCL, FSDP2 ZeRO 3 in bf16 with the mixed-precision policy, against one GPU;
- context parallelism on two NCCL ranks (its gradients' reduce-scatter, which gloo lacks),
  under DACP and all-sharded placement, against one GPU;
- ``autotune run --gpus 2 --budget-trials 3`` end to end;
- a peak traced by ``autotune memory`` against the peak ``autotune measure`` measures.

Every test here carries the ``gpu`` marker and skips, saying why, without CUDA (see
tests/conftest.py); those that need two devices skip on one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from autotune.config import RunConfig
from kernels.attention import Segments, attention, varlen_attention_reference

pytestmark = pytest.mark.gpu

LAYOUTS = [((0, 5, 130, 300, 301, 520), 0), ((0, 200, 260, 400), 70), ((0, 1000), 300)]


def _two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")


@pytest.mark.parametrize(("cu", "prefix"), LAYOUTS)
@pytest.mark.parametrize("impl", ["varlen", "flex"])
def test_gpu_attention_matches_reference_forward_and_backward(cu, prefix, impl: str) -> None:  # noqa: ANN001
    """bf16 kernels against fp32 math on the same bf16 inputs: 2e-2 (bf16 keeps 8 bits)."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    seg = Segments(cu, prefix=prefix, device=dev)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v = mk(seg.tokens, 8, 64), mk(seg.tokens, 2, 64), mk(seg.tokens, 2, 64)
    kp, vp = mk(prefix, 2, 64), mk(prefix, 2, 64)
    w = torch.randn(seg.tokens, 8, 64, device=dev)
    inputs = (q, k, v, kp, vp) if prefix else (q, k, v)
    out = attention(q, k, v, seg, impl=impl, prefix_kv=(kp, vp) if prefix else None)
    grads = torch.autograd.grad((out.float() * w).sum(), inputs)
    ref = varlen_attention_reference(*(t.float() for t in (q, torch.cat((kp, k)),
                                                           torch.cat((vp, v)))),
                                     seg.cu_q, seg.cu_k)
    ref_grads = torch.autograd.grad((ref * w).sum(), inputs)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2)


def _rc(policy: str, **extra) -> RunConfig:  # noqa: ANN003
    cfg = {
        "workload": {"model": {"layers": 4, "hidden": 256, "heads": 8, "kv_heads": 2,
                               "ffn": 512, "vocab": 1024},
                     "data": {"preset": "longsft", "num_sequences": 2000, "max_len": 2048},
                     "hardware": {"device": "cuda", "devices_per_node": 1},
                     "budget": {"global_batch_tokens": 16384}},
        "schedule": {"policy": policy, "micro_batch_tokens": 2048, "chunk_size": 512},
        "kernels": {"attention": "varlen"},
        "precision": {"dtype": "bf16"},
    }
    for key, value in extra.items():
        cfg[key] = value
    return RunConfig.model_validate(cfg)


@pytest.mark.parametrize("policy", ["pack", "chunkflow"])
def test_a_training_step_queues_its_work_without_host_synchronization(policy: str) -> None:
    from autotune.train.trainer import Trainer

    trainer = Trainer(_rc(policy), time_compute=False)
    trainer.step()  # first-step set-up (optimizer state, allocator) aside
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = trainer.launch_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert np.isfinite(pending.result().loss)  # the step's one read-back, outside


def test_two_nccl_ranks_fsdp2_bf16_match_one_gpu(tmp_path: Path) -> None:
    _two_gpus()
    from autotune.train.trainer import Trainer

    trainer = Trainer(_rc("pack"))
    ref = [trainer.step().loss for _ in range(3)]
    cfg = _rc("pack").model_dump(mode="json")
    cfg["workload"]["hardware"]["devices_per_node"] = 2
    cfg["parallel"] |= {"dp": 2, "zero_stage": 3}
    # bf16 over three steps, different reduction order: as the gloo test states, 1e-3.
    np.testing.assert_allclose(_train_on_two(cfg, tmp_path), ref, rtol=1e-3)


def _train_on_two(cfg: dict, tmp_path: Path) -> list[float]:
    from autotune.launch import Launch

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = Launch.for_config(RunConfig.model_validate(cfg)).argv("autotune.train.worker", [
        str(path), "--mode", "train", "--steps", "3", "--out", str(tmp_path / "summary.json")])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "summary.json").read_text())["losses"]


@pytest.mark.parametrize("placement", ["dacp", "all"])
def test_two_nccl_ranks_context_parallel_match_one_gpu(tmp_path: Path, placement: str) -> None:
    _two_gpus()
    from autotune.train.trainer import Trainer

    trainer = Trainer(_rc("pack"))
    ref = [trainer.step().loss for _ in range(3)]
    cfg = _rc("pack").model_dump(mode="json")
    cfg["workload"]["hardware"]["devices_per_node"] = 2
    cfg["parallel"] |= {"cp": 2}
    # a cp micro-batch holds cp x micro_batch_tokens: halved, the same micro-batches
    cfg["schedule"] |= {"cp_placement": placement,
                        "micro_batch_tokens": cfg["schedule"]["micro_batch_tokens"] // 2}
    # bf16 over three steps, different reduction order: as the FSDP2 case, 1e-3.
    np.testing.assert_allclose(_train_on_two(cfg, tmp_path), ref, rtol=1e-3)


def test_autotune_run_on_two_gpus_end_to_end(tmp_path: Path) -> None:
    _two_gpus()
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "autotune", "run", "--gpus", "2",
                           "--budget-trials", "3", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned = RunConfig.model_validate(yaml.safe_load((out / "tuned.yaml").read_text()))
    assert tuned.workload.hardware.device == "cuda"
    assert tuned.parallel.world_size == 2


def test_traced_peak_memory_matches_the_measured_peak_on_one_gpu(tmp_path: Path) -> None:
    """`autotune memory` traces on fake tensors what `autotune measure` measures with
    torch.cuda.max_memory_allocated: the same steps, the same live tensors. The allocator
    rounds each block to 512 bytes and keeps a cuBLAS workspace; 15% covers both at this
    size (a peak of a few GB)."""
    from autotune.measure import measure
    from autotune.memtrace import trace_memory
    from profilers.records import Status

    rc = RunConfig.model_validate({
        "workload": {"model": {"layers": 4, "hidden": 1024, "heads": 8, "kv_heads": 4,
                               "ffn": 2816, "vocab": 32000},
                     "data": {"preset": "longsft", "num_sequences": 256, "max_len": 4096},
                     "hardware": {"device": "cuda", "devices_per_node": 1},
                     "budget": {"global_batch_tokens": 16384, "memory_cap_gb": 40}},
        "schedule": {"policy": "pack", "micro_batch_tokens": 4096},
        "kernels": {"attention": "varlen"}, "precision": {"dtype": "bf16"}})
    traced = trace_memory(rc, warmup=1, steps=3).peak_bytes
    m = measure(rc, steps=3, warmup=1, workdir=tmp_path / "measure")
    assert m.status == Status.COMPLETE, m.reason
    assert traced * 0.9 <= m.peak_mem_bytes <= traced * 1.15, (m.peak_mem_bytes, traced)
