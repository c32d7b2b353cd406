"""Every policy trains the same function: one step's gradients equal those of processing
each sequence alone, with the loss as the token mean over the global batch.

The reference builds each sequence's tensors by hand and runs the model on it alone, so no
scheduling, packing, chunking or loss-scaling code of the trainer takes part in it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autotune.config import POLICIES, ModelDims, ScheduleConfig
from autotune.data import MarkovSource, SequenceSet
from autotune.data.policies import POLICY_CLASSES
from autotune.train.model import IGNORE_INDEX, Decoder, PackedBatch
from autotune.train.step import StepExecutor, materialize
from kernels.attention import Segments

DIMS = ModelDims(layers=2, hidden=32, heads=4, kv_heads=2, ffn=64, vocab=64, max_seq_len=512)
CHUNK = 16
# float32 gradients agree to summation-order noise: relative to the tensor's largest entry.
RTOL = 2e-5


def _lengths(seed: int) -> np.ndarray:
    """A long-tail mix with sequences shorter than, equal to and longer than CHUNK
    (up to 4.5 chunks) in random order."""
    rng = np.random.default_rng(seed)
    short = rng.integers(2, CHUNK, size=6)
    longer = rng.integers(CHUNK + 1, 4 * CHUNK + 9, size=3)
    mixed = np.concatenate([short, longer, [CHUNK, CHUNK]])
    return rng.permutation(mixed)


def _data(seed: int) -> tuple[SequenceSet, np.ndarray]:
    lengths = _lengths(seed)
    seqs, _ = MarkovSource(DIMS.vocab, seed).sample(lengths, np.random.default_rng(seed))
    return seqs, np.arange(len(lengths))


def _model(checkpoint_layers: int = 0) -> Decoder:
    torch.manual_seed(1234)
    return Decoder(DIMS, checkpoint_layers=checkpoint_layers)


def _grads(model: Decoder) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _alone(model: Decoder, x: np.ndarray) -> PackedBatch:
    ids = torch.from_numpy(x.astype(np.int64))
    labels = torch.cat([ids[1:], torch.tensor([IGNORE_INDEX])])
    return PackedBatch(ids, labels, torch.arange(len(x)), Segments((0, len(x))))


def reference_step(seqs: SequenceSet) -> tuple[float, dict[str, torch.Tensor]]:
    model = _model()
    targets = int((seqs.lengths - 1).sum())
    total = 0.0
    for i in range(len(seqs)):
        loss_sum, _ = model(_alone(model, seqs.seq(i)))
        (loss_sum / targets).backward()
        total += float(loss_sum.detach())
    return total, _grads(model)


def policy_step(seqs: SequenceSet, ids: np.ndarray, schedule: ScheduleConfig,
                checkpoint_layers: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    model = _model(checkpoint_layers)
    policy = POLICY_CLASSES[schedule.policy](schedule, DIMS, data_max_len=int(seqs.lengths.max()))
    plan = policy.plan(seqs.lengths[ids])
    out = StepExecutor(model, seqs, device=torch.device("cpu")).run(plan, ids)
    return out.loss_sum, _grads(model)


def assert_same_grads(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    for name, r in ref.items():
        scale = float(r.abs().max())
        torch.testing.assert_close(got[name], r, rtol=0, atol=RTOL * scale, msg=name)


SCHEDULES = [
    *(dict(policy=p, micro_batch_size=m) for p in ("pad-max", "pad-batch", "sorted")
      for m in (1, 3, 8)),
    *(dict(policy=p, micro_batch_tokens=t) for p in ("pack", "skrull") for t in (16, 40, 1000)),
    *(dict(policy="chunkflow", chunk_size=CHUNK, micro_batch_tokens=t, chunkflow_k=k)
      for t in (CHUNK, 24) for k in (1, 2, 5)),
]


def test_schedules_cover_every_policy() -> None:
    assert {s["policy"] for s in SCHEDULES} == set(POLICIES)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(map(str, s.values())))
def test_policy_gradients_equal_each_sequence_alone(seed: int, schedule: dict) -> None:
    seqs, ids = _data(seed)
    ref_loss, ref = reference_step(seqs)
    loss, got = policy_step(seqs, ids, ScheduleConfig(**schedule))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert_same_grads(got, ref)


@pytest.mark.parametrize("policy", ["chunkflow", "pack"])
@pytest.mark.parametrize("layers", [1, 2])
def test_activation_checkpointing_keeps_gradients(policy: str, layers: int) -> None:
    seqs, ids = _data(3)
    _, ref = reference_step(seqs)
    sched = ScheduleConfig(policy=policy, chunk_size=CHUNK, micro_batch_tokens=CHUNK)
    _, got = policy_step(seqs, ids, sched, checkpoint_layers=layers)
    assert_same_grads(got, ref)


def test_chunkflow_k_one_two_and_all_chunks_equal_unchunked() -> None:
    lengths = np.array([5 * CHUNK + 3, 7, CHUNK, 2 * CHUNK])  # the first splits into 6 chunks
    seqs, _ = MarkovSource(DIMS.vocab, 9).sample(lengths, np.random.default_rng(9))
    ids = np.arange(len(lengths))
    _, ref = reference_step(seqs)
    for k in (1, 2, 6):
        sched = ScheduleConfig(policy="chunkflow", chunk_size=CHUNK, micro_batch_tokens=CHUNK,
                               chunkflow_k=k)
        plan = make_policy_plan(sched, seqs)
        assert max(len(u.chunks) for u in plan.units if hasattr(u, "chunks")) == 6
        _, got = policy_step(seqs, ids, sched)
        assert_same_grads(got, ref)


def make_policy_plan(schedule: ScheduleConfig, seqs: SequenceSet):
    cls = POLICY_CLASSES[schedule.policy]
    return cls(schedule, DIMS, data_max_len=int(seqs.lengths.max())).plan(seqs.lengths)


def _logits_of(model: Decoder, batch: PackedBatch) -> torch.Tensor:
    captured = {}
    handle = model.output.register_forward_hook(lambda m, i, o: captured.setdefault("o", o))
    with torch.no_grad():
        model(batch)
    handle.remove()
    return captured["o"]


def test_packed_sequences_never_see_each_other() -> None:
    """Perturbing one sequence of a pack leaves every other sequence's logits unchanged."""
    lengths = np.array([9, 14, 5, 12])
    seqs, _ = MarkovSource(DIMS.vocab, 4).sample(lengths, np.random.default_rng(4))
    sched = ScheduleConfig(policy="pack", micro_batch_tokens=1000)
    (mb,) = make_policy_plan(sched, seqs).units
    model = _model()
    before = _logits_of(model, materialize(mb, seqs, np.arange(4), torch.device("cpu")))
    tokens = seqs.tokens.copy()
    tokens[seqs.offsets[1]:seqs.offsets[2]] = (tokens[seqs.offsets[1]:seqs.offsets[2]] + 7) % 64
    perturbed = SequenceSet(tokens, seqs.offsets, seqs.vocab)
    after = _logits_of(model, materialize(mb, perturbed, np.arange(4), torch.device("cpu")))
    cu = [0]
    for seg in mb.segments:
        cu.append(cu[-1] + seg.padded)
    for i, seg in enumerate(mb.segments):
        rows = slice(cu[i], cu[i + 1])
        if seg.seq == 1:
            assert not torch.equal(before[rows], after[rows])
        else:
            torch.testing.assert_close(after[rows], before[rows], rtol=0, atol=1e-6)


def test_positions_restart_per_sequence_and_continue_across_chunks() -> None:
    lengths = np.array([3, 2 * CHUNK + 5, 4])
    seqs, _ = MarkovSource(DIMS.vocab, 5).sample(lengths, np.random.default_rng(5))
    pack = make_policy_plan(ScheduleConfig(policy="pack", micro_batch_tokens=1000), seqs)
    (mb,) = pack.units
    batch = materialize(mb, seqs, np.arange(3), torch.device("cpu"))
    expected = np.concatenate([np.arange(lengths[s.seq]) for s in mb.segments])
    assert batch.positions.tolist() == expected.tolist()
    sched = ScheduleConfig(policy="chunkflow", chunk_size=CHUNK, micro_batch_tokens=CHUNK)
    group = next(u for u in make_policy_plan(sched, seqs).units if hasattr(u, "chunks"))
    starts = [materialize(c, seqs, np.arange(3), torch.device("cpu")).positions[0].item()
              for c in group.chunks]
    assert starts == [0, CHUNK, 2 * CHUNK]


def test_a_sequence_packed_behind_others_gives_its_logits_alone() -> None:
    """Isolation and restarted positions together: packed logits equal the lone run's."""
    lengths = np.array([11, 6, 13])
    seqs, _ = MarkovSource(DIMS.vocab, 6).sample(lengths, np.random.default_rng(6))
    model = _model()
    (mb,) = make_policy_plan(ScheduleConfig(policy="pack", micro_batch_tokens=1000), seqs).units
    packed = _logits_of(model, materialize(mb, seqs, np.arange(3), torch.device("cpu")))
    at = 0
    for seg in mb.segments:
        alone = _logits_of(model, _alone(model, seqs.seq(seg.seq)))
        torch.testing.assert_close(packed[at:at + seg.length], alone, rtol=0, atol=1e-5)
        at += seg.padded
