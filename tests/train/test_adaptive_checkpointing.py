"""Input-aware checkpointing: the tracked tensor peak of a step stays under the budget, with
fewer layers recomputed than under full checkpointing, and training is unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from autotune.config import RunConfig
from autotune.train.trainer import Trainer
from profilers.memory import TensorMemoryTracker

LAYERS = 4
TINY = {
    "workload": {
        "model": {"layers": LAYERS, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128,
                  "vocab": 64},
        "data": {"preset": "longsft", "num_sequences": 2000, "max_len": 1024},
        "budget": {"global_batch_tokens": 2048},
    },
    "schedule": {"policy": "sorted", "micro_batch_size": 4},
}


def _trainer(**checkpointing) -> Trainer:
    return Trainer(RunConfig.model_validate(TINY | {"checkpointing": checkpointing}))


def _peak(trainer: Trainer, ids: np.ndarray) -> int:
    """The step's peak of live tensor bytes, parameters and optimizer state included."""
    state = [t for s in trainer.optimizer.state.values() for t in s.values()]
    with TensorMemoryTracker(existing=list(trainer.params) + state) as mt:
        trainer.step(ids)
    return mt.peak_bytes


def test_adaptive_holds_the_budget_and_recomputes_less_than_full() -> None:
    none, full = _trainer(policy="none"), _trainer(policy="full")
    for t in (none, full):
        t.step()  # warm: the optimizer state exists
    heavy = max((none.step() for _ in range(3)), key=lambda r: r.max_seq_len).batch_ids
    peak_none, peak_full = _peak(none, heavy), _peak(full, heavy)
    assert peak_full < 0.7 * peak_none  # the budget below has room to decide in
    budget = (peak_full + peak_none) / 2

    adaptive = _trainer(policy="adaptive", memory_budget_gb=budget / 1e9)
    for _ in range(3):  # probing, then the fit is frozen
        adaptive.step()
    plans = adaptive.executor.adaptive
    assert plans.coef is not None
    plans.plans.clear()
    peak = _peak(adaptive, heavy)
    assert peak <= budget
    assert np.mean(plans.plans) < LAYERS  # some micro-batches keep layers
    assert max(plans.plans) >= 1  # and the heavy ones checkpoint some


def _gradients(trainer: Trainer, steps: int) -> list[list[np.ndarray]]:
    """Every parameter's gradient as the optimizer receives it (clipped), per step."""
    seen: list[list[np.ndarray]] = []
    real = trainer.optimizer.step

    def step(*a, **k):  # noqa: ANN002, ANN003, ANN202
        seen.append([q.grad.detach().clone().numpy() for q in trainer.params])
        return real(*a, **k)

    trainer.optimizer.step = step
    for _ in range(steps):
        trainer.step()
    return seen


def test_adaptive_trains_the_same_function() -> None:
    """The same gradients, parameter by parameter, over three steps (the first ones under
    its probing plans, the last under the fitted plan), as training without checkpointing;
    a budget this small makes it recompute."""
    plain = _gradients(_trainer(policy="none"), 3)
    adaptive = _trainer(policy="adaptive", memory_budget_gb=0.01)
    got = _gradients(adaptive, 3)
    assert max(adaptive.executor.adaptive.plans) >= 1  # some layers were recomputed
    for step_plain, step_got in zip(plain, got, strict=True):
        for a, b in zip(step_plain, step_got, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_adaptive_needs_a_budget() -> None:
    with pytest.raises(ValueError, match="memory_budget_gb"):
        RunConfig.model_validate(TINY | {"checkpointing": {"policy": "adaptive"}})


def test_adaptive_under_chunkflow_trains_the_same_function() -> None:
    """Chunk groups take one plan (by their widest chunk); gradients are unchanged."""
    cf = {"policy": "chunkflow", "chunk_size": 64, "micro_batch_tokens": 128}

    def losses(**ck) -> list[float]:
        t = Trainer(RunConfig.model_validate(TINY | {"schedule": cf, "checkpointing": ck}))
        return [t.step().loss for _ in range(3)]

    np.testing.assert_allclose(losses(policy="adaptive", memory_budget_gb=0.05),
                               losses(policy="none"), rtol=1e-5)
