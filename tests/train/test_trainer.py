"""The trainer end to end on a tiny model: deterministic, and it learns."""

from __future__ import annotations

import numpy as np
import pytest

from autotune.config import RunConfig
from autotune.train.trainer import Trainer

TINY = {
    "workload": {
        "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 64},
        "data": {"preset": "longsft", "num_sequences": 4000, "max_len": 1024},
        "budget": {"global_batch_tokens": 1024},
    },
    "schedule": {"policy": "chunkflow", "chunk_size": 64, "micro_batch_tokens": 128},
    "optimizer": {"lr": 3e-3},
}


def _losses(steps: int, **schedule) -> list[float]:
    data = {**TINY, "schedule": {**TINY["schedule"], **schedule}}
    trainer = Trainer(RunConfig.model_validate(data))
    return [trainer.step().loss for _ in range(steps)]


def test_same_seed_gives_bit_identical_losses() -> None:
    assert _losses(3) == _losses(3)


def test_policies_train_the_same_function() -> None:
    """Same data, same seed: the first loss is the same for every policy (the loss is the
    token mean over the global batch), and later ones agree to float32 noise."""
    ref = _losses(3, policy="pack")
    for policy in ("chunkflow", "pad-batch", "skrull"):
        got = _losses(3, policy=policy)
        assert abs(got[0] - ref[0]) < 1e-5
        np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_loss_falls_towards_the_markov_floor() -> None:
    trainer = Trainer(RunConfig.model_validate(TINY))
    losses = [trainer.step().loss for _ in range(40)]
    assert losses[0] > np.log(64) - 0.2  # starts near uniform
    assert np.mean(losses[-5:]) < losses[0] - 1.0  # and learns the structure
    assert np.mean(losses[-5:]) > trainer.dataset.entropy_floor  # never below the floor


def test_bf16_autocast_trains_close_to_fp32() -> None:
    fp32 = _losses(2)
    data = {**TINY, "precision": {"dtype": "bf16"}}
    trainer = Trainer(RunConfig.model_validate(data))
    bf16 = [trainer.step().loss for _ in range(2)]
    # bf16 keeps 8 mantissa bits: the token-mean loss agrees to about 1%.
    np.testing.assert_allclose(bf16, fp32, rtol=0.02)


def test_tunable_kernels_train_the_same_function() -> None:
    """Fused linear cross-entropy, fused RMSNorm and blocked attention (with block sizes that
    split the chunks, pinned as a tuned config would be) against the default kernels: the
    same losses over three optimizer steps, to float32 noise."""
    ref = _losses(3)
    data = {**TINY, "kernels": {"attention": "blocked", "loss": "fused", "norm": "fused",
                                "tuning_cache": "none",
                                "configs": {"attention": {"block_q": 16, "block_k": 32},
                                            "linear_ce": {"chunk_tokens": 48},
                                            "rmsnorm": {"block_rows": 40}}}}
    trainer = Trainer(RunConfig.model_validate(data))
    got = [trainer.step().loss for _ in range(3)]
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_evaluation_is_the_token_mean_loss_on_held_out_sequences() -> None:
    """``evaluate`` packs the held-out set into micro-batches; the reference runs every
    sequence alone through the model and averages by hand. The held-out draws are not the
    training draws, and they come from the same chain (the same entropy floor, to 5%: 40
    sequences are a small sample)."""
    import torch

    from autotune.data import MicroBatch, Segment, load_eval_dataset
    from autotune.train.step import materialize

    rc = RunConfig.model_validate(TINY)
    trainer = Trainer(rc)
    for _ in range(3):
        trainer.step()
    held = load_eval_dataset(rc.workload.data, trainer.dims, 40)
    train_seqs = {trainer.dataset.sequences.seq(i).tobytes() for i in range(len(trainer.dataset.lengths))}
    # short ones can coincide by chance (vocabulary 64); a longer one only by reuse
    longer = [i for i in range(40) if held.lengths[i] >= 8]
    assert longer and not any(held.sequences.seq(i).tobytes() in train_seqs for i in longer)
    assert abs(held.entropy_floor - trainer.dataset.entropy_floor) < 0.05 * trainer.dataset.entropy_floor
    got = trainer.evaluate(held.sequences, micro_batch_tokens=256)
    total = 0.0
    with torch.no_grad():
        for i, n in enumerate(held.lengths.tolist()):
            mb = MicroBatch((Segment(i, 0, n, n),))
            total += float(trainer.model(materialize(mb, held.sequences, np.arange(40), trainer.device))[0])
    assert got == pytest.approx(total / int((held.lengths - 1).sum()), rel=1e-5)
    assert trainer.evaluate(held.sequences) == pytest.approx(got, rel=1e-5)  # packing-free figure
