"""Context parallelism on CPU ranks (gloo) against the single process: cp=2, and dp=2 x cp=2
(4 ranks), under each placement (dacp, all-sharded, none-sharded), on length mixes with
sequences shorter than, equal to and far longer than 2 x cp tokens. Losses, clipped gradient
norms and every rank's final parameters must match the single process within the tolerances
of the other parity tests (tests/train/test_distributed.py), fp32, 3 steps."""

from __future__ import annotations

import numpy as np
import pytest

from autotune.config import RunConfig
from autotune.data import MicroBatch, Segment
from autotune.data.context_parallel import CPU_SHARD_COST, Placer, pieces, place, shard_cost
from tests.train.test_distributed import LOSS_RTOL, PARAM_ATOL, _single, _torchrun, cfg_clip


def _lengths(tmp, longest: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    # short (below 2 x cp = 4), exactly 4, and a long tail up to ``longest``
    lengths = np.concatenate([[2, 3, 4, 4, 5], rng.integers(2, 40, 120),
                              rng.integers(100, longest + 1, 12)])
    rng.shuffle(lengths)
    path = tmp / "lengths.npy"
    np.save(path, lengths.astype(np.int64))
    return str(path)


def _config(tmp, parallel: dict, placement: str, longest: int) -> dict:
    world = parallel.get("dp", 1) * parallel.get("cp", 1)
    return {
        "workload": {
            "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 96},
            "data": {"path": _lengths(tmp, longest)},
            "budget": {"global_batch_tokens": 1024},
            "hardware": {"devices_per_node": world},
        },
        "schedule": {"policy": "pack", "micro_batch_tokens": 128, "cp_placement": placement},
        "parallel": parallel,
    }


CASES = {
    "cp2-dacp": ({"cp": 2}, "dacp", 250),
    "cp2-all": ({"cp": 2}, "all", 250),
    "cp2-none": ({"cp": 2}, "none", 128),
    "dp2-cp2-dacp": ({"dp": 2, "cp": 2, "zero_stage": 3}, "dacp", 250),
    "dp2-cp2-all": ({"dp": 2, "cp": 2}, "all", 250),
    "dp2-cp2-none": ({"dp": 2, "cp": 2, "zero_stage": 2}, "none", 128),
}


# make test runs every placement on 2 ranks and DACP on 4; the rest run with -m slow
_SLOW = {"dp2-cp2-all", "dp2-cp2-none"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in _SLOW else c
                                  for c in CASES])
def test_context_parallel_matches_single_process(case: str, tmp_path) -> None:  # noqa: ANN001
    parallel, placement, longest = CASES[case]
    cfg = _config(tmp_path, parallel, placement, longest)
    _check_the_mix(RunConfig.model_validate(cfg), placement)
    ref_losses, ref_norms, ref_params = _single(cfg)
    losses, norms, ranks = _torchrun(cfg, tmp_path)
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    np.testing.assert_allclose(norms, ref_norms, rtol=LOSS_RTOL)
    assert max(ref_norms) > cfg_clip(cfg)  # so clipping really scaled these gradients
    for params in ranks:
        assert set(params) == set(ref_params)
        for name, value in params.items():
            np.testing.assert_allclose(value, ref_params[name], rtol=0, atol=PARAM_ATOL,
                                       err_msg=f"{case}: {name}")


def _check_the_mix(rc: RunConfig, placement: str) -> None:
    """The steps trained hold sequences shorter than, equal to and longer than 2 x cp, and
    the placement shards (or keeps whole) what the case means to exercise."""
    from itertools import islice

    from autotune.data import load_lengths, step_plans

    dims = rc.workload.model.resolve()
    lengths = load_lengths(rc.workload.data, dims).lengths
    placer = Placer.of(rc, dims)
    assert placer.placement == placement
    seen, sharded, whole = set(), 0, 0
    for batch in islice(step_plans(rc, lengths, dims), 3):
        for plan in batch.ranks:
            for mb in plan.micro_batches():
                shares = placer(mb)
                sharded += len(shares[0].sharded)
                whole += sum(len(s.local) for s in shares)
                seen |= {min(s.length, 5) for s in mb.segments}
    assert {2, 3, 4, 5} <= seen
    if placement != "none":
        assert sharded > 0
    if placement != "all":
        assert whole > 0


def _mb(*lengths: int) -> MicroBatch:
    return MicroBatch(tuple(Segment(i, 0, n, n) for i, n in enumerate(lengths)))


def test_pieces_balance_causal_work() -> None:
    assert pieces(10, 2) == (0, 3, 6, 8, 10)
    # rank i holds pieces i and 2cp-1-i: each rank's causal pairs within 1 token's row of equal
    b = pieces(4096, 4)
    work = []
    for r in range(4):
        rows = [*range(b[r], b[r + 1]), *range(b[7 - r], b[8 - r])]
        work.append(sum(t + 1 for t in rows))
    assert max(work) - min(work) <= 4096


def test_placements() -> None:
    mb = _mb(3, 4, 40, 300)
    kw = {"hidden": 64, "rank_tokens": 128, "shard_cost": (1.0, 0.0)}
    alls = place(mb, 2, "all", **kw)
    assert [s.segment.length for s in alls[0].sharded] == [4, 40, 300]
    assert [s.length for s in alls[0].local + alls[1].local] == [3]  # too short to split
    none = place(_mb(3, 4, 40, 100), 2, "none", **kw)
    assert not none[0].sharded and sorted(s.length for s in none[0].local + none[1].local) == [3, 4, 40, 100]
    dacp = place(mb, 2, "dacp", **kw)
    assert [s.segment.length for s in dacp[0].sharded] == [300]  # over one rank's budget
    assert {s.length for s in dacp[0].local + dacp[1].local} == {3, 4, 40}
    with pytest.raises(ValueError, match="keeps it whole"):
        place(mb, 2, "none", **kw)
    # every token runs exactly once across the group
    for shares in (alls, dacp):
        assert sum(s.tokens(r, 2) for r, s in enumerate(shares)) == 347


def test_dacp_weighs_what_sharding_costs() -> None:
    """By hand, hidden 64 (a sequence of length L costs L (1 + L / 768)): whole, the
    1000-token sequence costs 2302 on one rank against the two 200s' 2 x 252 on the other;
    sharded, each rank runs 1151 + 252 + 500 w + s, w per token and s per sequence. It pays
    below w = 1.8 (s = 0) and below s = 899 (w = 0), and not above."""
    mb = _mb(1000, 200, 200)
    for cost, sharded in (((0.2, 0.0), [1000]), ((1.7, 0.0), [1000]), ((1.9, 0.0), []),
                          ((0.0, 850.0), [1000]), ((0.0, 950.0), [])):
        shares = place(mb, 2, "dacp", hidden=64, rank_tokens=2000, shard_cost=cost)
        assert [s.segment.length for s in shares[0].sharded] == sharded, cost


def test_shard_cost_by_hand() -> None:
    """Llama 3 8B in bf16 on GPUs: 6 x 218,103,808 FLOPs of linear work a token and layer at
    989 TFLOP/s x 0.815 is 1.6235 us; its keys and values (2 x 1,024 bf16) gathered and
    reduced back move 8,192 bytes, 22.14 ns at 370 GB/s: 0.01364 of a token; a sharded
    sequence's ~40 kernels a layer at 4.3 us are 105.9 tokens' work. On CPUs, as measured."""
    rc = RunConfig.model_validate({"workload": {"model": {"preset": "llama3-8b"}}})
    dims = rc.workload.model.resolve()
    per_token, per_seq = shard_cost(dims, tp=1, act_bytes=2, device="cuda")
    assert per_token == pytest.approx(0.01364, rel=1e-3)
    assert per_seq == pytest.approx(105.9, rel=1e-3)
    # tensor parallelism shards both the work and the heads gathered alike
    assert shard_cost(dims, tp=2, act_bytes=2, device="cuda")[0] == pytest.approx(per_token)
    assert shard_cost(dims, tp=1, act_bytes=4, device="cpu") == CPU_SHARD_COST


@pytest.mark.parametrize(("schedule", "expect"), [
    ({"policy": "pad-max"}, "context parallelism shards packed sequences"),
    ({"policy": "chunkflow"}, "use pack or skrull"),
    ({"policy": "pack", "micro_batch_tokens": 3}, "2 x cp = 4"),
])
def test_bad_inputs_name_the_problem(schedule: dict, expect: str) -> None:
    cfg = {"workload": {"hardware": {"devices_per_node": 2}}, "parallel": {"cp": 2},
           "schedule": schedule}
    with pytest.raises(ValueError, match=expect):
        RunConfig.model_validate(cfg)


def test_the_step_model_prices_the_busiest_rank_and_the_gathers() -> None:
    from autotune.predict import StepPredictor
    from cost_models.bundle import StepModels
    from cost_models.features import Ceilings

    def rc(parallel: dict, placement: str = "dacp") -> RunConfig:
        world = parallel.get("dp", 1) * parallel.get("cp", 1)
        return RunConfig.model_validate({
            "workload": {"model": {"preset": "llama-tiny"},
                         "data": {"preset": "fixed", "max_len": 4096, "num_sequences": 64},
                         "hardware": {"devices_per_node": world},
                         "budget": {"global_batch_tokens": 8192}},
            "schedule": {"policy": "pack", "micro_batch_tokens": 4096, "cp_placement": placement},
            "parallel": parallel})

    models = StepModels("fp", "cpu", Ceilings({"fp32": 1e10, "bf16": 1e10}, 1e10))
    rows = StepPredictor(models).predict_many([rc({"dp": 2}), rc({"cp": 2}, "all")])
    dp, cp = rows.iloc[0], rows.iloc[1]
    # by hand: every 4096-token sequence is sharded, so each cp rank runs half of each; dp=2
    # runs one whole sequence per rank: the same tokens and (balanced) attention per rank
    assert cp.breakdown["gemm"] == pytest.approx(dp.breakdown["gemm"], rel=1e-6)
    assert cp.breakdown["attention"] == pytest.approx(dp.breakdown["attention"], rel=0.01)
    assert cp.breakdown["comm_cp"] > 0 and "comm_cp" not in dp.breakdown
