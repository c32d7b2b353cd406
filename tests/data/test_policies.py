"""Conformance of every scheduling policy, plus hand-checked cases per policy."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest

from autotune.config import (
    POLICIES,
    POLICY_KNOBS,
    SCHEDULE_KNOBS,
    ModelDims,
    ScheduleConfig,
    SearchSpace,
)
from autotune.config._runconfig import Policy
from autotune.data import ChunkGroup, MicroBatch, StepPlan
from autotune.data.cost import sequence_flops
from autotune.data.policies import POLICY_CLASSES, best_fit_decreasing

DIMS = ModelDims(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=128)


def _policy(policy: str, lengths, **sched):
    s = ScheduleConfig(policy=policy, **sched)
    return POLICY_CLASSES[policy](s, DIMS, data_max_len=int(np.max(lengths)))


def _plan(policy: str, lengths, **sched) -> StepPlan:
    lengths = np.asarray(lengths, dtype=np.int64)
    return _policy(policy, lengths, **sched).plan(lengths)


# The schedule fields the search chooses, besides the policy itself.
SEARCHED = sorted(set(ScheduleConfig.model_fields) & set(SearchSpace.model_fields) - {"policy"})


def test_every_policy_declares_the_schedule_knobs_it_reads() -> None:
    assert set(POLICY_CLASSES) == set(POLICY_KNOBS) == set(get_args(Policy))
    assert all(POLICY_KNOBS.values())
    assert sorted(SCHEDULE_KNOBS) == SEARCHED


# Sequences above and below every chunk size below, several micro-batches under every budget:
# each knob changes the plan of every policy that reads it.
KNOB_LENGTHS = np.array([300, 40, 700, 90, 120, 1000, 60, 500, 30, 250, 180, 75])
BASE_KNOBS = {"chunk_size": 256, "chunkflow_k": 1, "micro_batch_tokens": 512, "micro_batch_size": 2}
OTHER_KNOBS = {"chunk_size": 128, "chunkflow_k": 2, "micro_batch_tokens": 1024, "micro_batch_size": 3}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("knob", SEARCHED)
def test_a_policy_plans_by_its_declared_knobs_and_no_other(policy: str, knob: str) -> None:
    """The declaration checked against the planner: changing a declared knob changes the
    plans (on one rank or split over two), changing any other leaves them as they were."""
    def plans(**knobs: int) -> list:
        policy_ = _policy(policy, KNOB_LENGTHS, **knobs)
        return [p.units for ranks in (1, 2) for p in policy_.plan_ranks(KNOB_LENGTHS, ranks)]

    changed = plans(**BASE_KNOBS | {knob: OTHER_KNOBS[knob]}) != plans(**BASE_KNOBS)
    assert changed == (knob in POLICY_KNOBS[policy])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", range(5))
def test_every_real_token_is_scheduled_exactly_once(policy: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(2), np.log(300), size=40)).astype(np.int64)
    plan = _plan(policy, lengths, chunk_size=64, micro_batch_tokens=128, micro_batch_size=4)
    covered = [np.zeros(n, dtype=int) for n in lengths]
    for mb in plan.micro_batches():
        for seg in mb.segments:
            covered[seg.seq][seg.start:seg.start + seg.length] += 1
    assert all((c == 1).all() for c in covered)
    assert plan.real_tokens == lengths.sum()
    assert plan.tokens >= plan.real_tokens


def test_pad_max_pads_to_the_data_maximum() -> None:
    plan = _plan("pad-max", [3, 9, 4, 5, 2], micro_batch_size=2)
    assert [[s.padded for s in mb.segments] for mb in plan.micro_batches()] == [[9, 9], [9, 9], [9]]


def test_pad_batch_keeps_arrival_order_and_pads_to_group_max() -> None:
    plan = _plan("pad-batch", [3, 9, 4, 5, 2], micro_batch_size=2)
    assert [[(s.seq, s.padded) for s in mb.segments] for mb in plan.micro_batches()] == \
        [[(0, 9), (1, 9)], [(2, 5), (3, 5)], [(4, 2)]]


def test_sorted_groups_by_length() -> None:
    plan = _plan("sorted", [3, 9, 4, 5, 2], micro_batch_size=2)
    assert [[(s.seq, s.padded) for s in mb.segments] for mb in plan.micro_batches()] == \
        [[(1, 9), (3, 9)], [(2, 4), (0, 4)], [(4, 2)]]


def test_best_fit_decreasing_hand_example() -> None:
    # 5 -> A(3 left); 4 -> B(4 left); 3 -> A (fullest that fits); 3 -> B; 2 -> C; 1 -> B.
    bins, room = best_fit_decreasing(np.array([5, 4, 3, 3, 2, 1]), 8)
    assert [sorted(b) for b in bins] == [[0, 2], [1, 3, 5], [4]]
    assert room == [0, 0, 6]


def test_best_fit_fills_existing_bins_first_and_isolates_oversize_items() -> None:
    bins, room = best_fit_decreasing(np.array([12, 2, 3]), 8, free=[3, 2])
    assert bins == [[2], [1], [0]]
    assert room == [0, 0, 0]


def test_pack_respects_the_token_budget() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 100, size=200)
    plan = _plan("pack", lengths, micro_batch_tokens=256)
    assert all(mb.tokens <= 256 for mb in plan.micro_batches())
    # Best fit wastes little: at most one bin's worth beyond the token lower bound.
    assert plan.n_micro <= int(np.ceil(lengths.sum() / 256)) + 1


def test_skrull_places_longest_first_on_least_loaded_bin() -> None:
    """Against a direct re-statement of the rule: ceil(tokens / cap) bins to start with,
    longest sequence first onto the bin of least estimated FLOPs that has token room, a new
    bin when none has."""
    lengths = np.array([4, 6, 3, 5, 2, 7, 1])
    plan = _plan("skrull", lengths, micro_batch_tokens=10)
    cost = sequence_flops(lengths, DIMS)
    bins: list[list[int]] = [[] for _ in range(3)]
    for i in np.argsort(-lengths, kind="stable"):
        fits = [b for b in range(len(bins)) if lengths[bins[b]].sum() + lengths[i] <= 10]
        if not fits:
            bins.append([])
            fits = [len(bins) - 1]
        bins[min(fits, key=lambda b: cost[bins[b]].sum())].append(int(i))
    assert sorted(sorted(s.seq for s in mb.segments) for mb in plan.micro_batches()) == \
        sorted(sorted(b) for b in bins if b)


def test_skrull_balances_compute_better_than_token_packing() -> None:
    """Equal-token packs are not equal work: skrull's max/mean FLOPs per micro-batch is
    no worse than pack's on long-tail batches with the same number of micro-batches."""
    rng = np.random.default_rng(1)
    wins = 0
    for _ in range(20):
        lengths = np.exp(rng.uniform(np.log(4), np.log(500), size=60)).astype(np.int64)
        imb = {}
        for p in ("pack", "skrull"):
            plan = _plan(p, lengths, micro_batch_tokens=1024)
            loads = [sequence_flops(np.array([s.length for s in mb.segments]), DIMS).sum()
                     for mb in plan.micro_batches()]
            imb[p] = (max(loads) / np.mean(loads), len(loads))
        if imb["skrull"][1] == imb["pack"][1]:
            wins += imb["skrull"][0] <= imb["pack"][0] + 1e-9
    assert wins >= 15


def test_chunkflow_splits_only_longer_than_chunk_and_keeps_k() -> None:
    lengths = np.array([40, 16, 5, 17, 3])
    plan = _plan("chunkflow", lengths, chunk_size=16, micro_batch_tokens=16, chunkflow_k=2)
    groups = [u for u in plan.units if isinstance(u, ChunkGroup)]
    assert sorted(g.chunks[0].segments[0].seq for g in groups) == [0, 3]
    by_seq = {g.chunks[0].segments[0].seq: g for g in groups}
    assert [c.segments[0].length for c in by_seq[0].chunks] == [16, 16, 8]
    assert [c.segments[0].length for c in by_seq[3].chunks] == [16, 1]
    assert by_seq[0].keep == 2 and by_seq[3].keep == 2
    singles = [u for u in plan.units if isinstance(u, MicroBatch)]
    for mb in plan.micro_batches():
        assert mb.tokens <= 16
    whole = {s.seq for mb in singles for s in mb.segments} | \
            {s.seq for g in groups for c in g.chunks for s in c.segments[1:]}
    assert whole == {1, 2, 4}  # 16 == chunk_size stays whole


def test_chunkflow_fills_the_last_chunk_of_a_group_with_short_sequences() -> None:
    plan = _plan("chunkflow", [20, 10, 6], chunk_size=16, micro_batch_tokens=16)
    (group,) = [u for u in plan.units if isinstance(u, ChunkGroup)]
    last = group.chunks[-1]
    assert [(s.seq, s.start, s.length) for s in last.segments] == [(0, 16, 4), (1, 0, 10)]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("ranks", [2, 3])
def test_rank_plans_cover_every_token_once(policy: str, ranks: int) -> None:
    rng = np.random.default_rng(ranks)
    lengths = np.exp(rng.uniform(np.log(2), np.log(300), size=41)).astype(np.int64)
    s = ScheduleConfig(policy=policy, chunk_size=64, micro_batch_tokens=128, micro_batch_size=4)
    plans = POLICY_CLASSES[policy](s, DIMS, data_max_len=int(lengths.max())).plan_ranks(
        lengths, ranks)
    assert len(plans) == ranks
    covered = [np.zeros(n, dtype=int) for n in lengths]
    for plan in plans:
        for mb in plan.micro_batches():
            for seg in mb.segments:
                covered[seg.seq][seg.start:seg.start + seg.length] += 1
    assert all((c == 1).all() for c in covered)


def test_balanced_split_is_longest_processing_time_first() -> None:
    from autotune.data.policies import arrival_order_split, balanced_split

    # loads: 10 -> r0; 7 -> r1; 5 -> r1 (7 < 10); 4 -> r0 (10 < 12); 2 -> r1 (12 < 14).
    parts = balanced_split(np.array([10.0, 7.0, 5.0, 4.0, 2.0]), 2)
    assert [p.tolist() for p in parts] == [[0, 3], [1, 2, 4]]
    assert [p.tolist() for p in arrival_order_split(5, 2)] == [[0, 2, 4], [1, 3]]


def test_skrull_rank_balance_beats_arrival_order_on_long_tail_batches() -> None:
    from autotune.config import MODEL_PRESETS
    from autotune.data import global_batches
    from autotune.data.cost import plan_flops
    from autotune.data.sequences import longsft_lengths

    dims = MODEL_PRESETS["llama-tiny"]
    lengths = longsft_lengths(5000, 2048, np.random.default_rng(0))
    stream = global_batches(lengths, global_batch_tokens=8192, seed=0)
    ratios = {"balanced": [], "arrival": []}
    for _ in range(40):
        ids = next(stream)
        for split in ratios:
            s = ScheduleConfig(policy="skrull", micro_batch_tokens=2048, rank_split=split)
            plans = POLICY_CLASSES["skrull"](s, dims, data_max_len=2048).plan_ranks(
                lengths[ids], 2)
            load = np.array([plan_flops(p, dims) for p in plans])
            ratios[split].append(load.max() / load.mean())
    assert np.median(ratios["balanced"]) <= 1.05
    assert np.median(ratios["balanced"]) < np.median(ratios["arrival"])
