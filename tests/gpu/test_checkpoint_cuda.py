"""Checkpoints on a CUDA device: what a CPU cannot check (the CUDA RNG state's round trip).

    .venv/bin/python -m pytest tests/gpu/test_checkpoint_cuda.py -m gpu -q     # seconds
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from autotune.config import RunConfig, load_yaml
from autotune.train import checkpoint
from autotune.train.distributed import init_parallel
from autotune.train.trainer import Trainer

pytestmark = pytest.mark.gpu

EXAMPLE = Path(__file__).parents[2] / "examples" / "chunkflow.yaml"


def _on_cuda() -> RunConfig:
    cfg = load_yaml(RunConfig, EXAMPLE).model_dump()
    cfg["workload"]["hardware"]["device"] = "cuda"
    return RunConfig.model_validate(cfg)


def test_resume_on_cuda_restores_the_rng_and_continues(tmp_path: Path) -> None:
    rc = _on_cuda()
    ctx = init_parallel(rc)
    trainer = Trainer(rc, ctx=ctx)
    trainer.step()
    torch.cuda.manual_seed(7)  # a state the new trainer's own seeding would not give
    torch.rand(3, device=ctx.device)
    expected = torch.cuda.get_rng_state(ctx.device)
    checkpoint.save(trainer, tmp_path / "ck")
    reference = [trainer.step().loss for _ in range(2)]
    resumed = Trainer(rc, ctx=ctx)
    checkpoint.load(resumed, checkpoint.find(tmp_path / "ck"))
    assert torch.equal(torch.cuda.get_rng_state(ctx.device), expected)
    # TF32 and the attention kernels may sum in another order from run to run: the parity
    # tests' tolerance, not bit identity
    np.testing.assert_allclose([resumed.step().loss for _ in range(2)], reference, rtol=1e-5)
