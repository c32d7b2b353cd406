"""The baselines the tuner is judged against: each spends at most its budget, measures a
config once across strategies, and searches the way the system it stands for does."""

from __future__ import annotations

import itertools

import optuna

from autotune.config import POLICY_KNOBS, SCHEDULE_KNOBS, RunConfig, SearchSpace, Workload
from autotune.propose import SpaceEncoding
from autotune.tune.sources import Recorded
from autotune.tune.strategies import Context, drive, make
from autotune.tune.study import Trial, config_key
from profilers.records import Measurement

WORKLOAD = {
    "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 96},
    "data": {"preset": "longsft", "num_sequences": 128, "max_len": 512, "seed": 0},
    "hardware": {"devices_per_node": 2},
    "budget": {"global_batch_tokens": 2048},
}
SPACE = SearchSpace(policy=["pad-batch", "pack", "chunkflow"], micro_batch_size=[1, 2, 4, 8],
                    micro_batch_tokens=[256, 512, 1024], chunk_size=[128, 256],
                    zero_stage=[0, 3], checkpointing=["none", "full"])

# pad-batch, data parallel, no checkpointing: tokens/s by (ZeRO stage, micro-batch);
# None runs out of memory.
DS_TRUTH = {(0, 1): 100.0, (0, 2): 150.0, (0, 4): 200.0, (0, 8): None,
            (3, 1): 80.0, (3, 2): 120.0, (3, 4): 170.0, (3, 8): 210.0}


def _candidates() -> list[RunConfig]:
    return list(SPACE.grid(Workload.model_validate(WORKLOAD)))


class Machine:
    """A recorded machine: DS_TRUTH on the DeepSpeed sub-space, 50 tokens/s elsewhere,
    counting every measurement it is asked for."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, rc: RunConfig, workdir: object = None, **_: object) -> Measurement:
        self.calls.append(config_key(rc))
        tps = 50.0
        if (rc.schedule.policy == "pad-batch" and rc.parallel.dp == 2
                and rc.checkpointing.policy == "none"):
            tps = DS_TRUTH[(rc.parallel.zero_stage, rc.schedule.micro_batch_size)]
        if tps is None:
            return Measurement(status="OOM", reason="out of memory")
        return Measurement(status="COMPLETE", tokens_per_s=tps, step_time_s=1.0)


def _search(name: str, cands: list[RunConfig], measure: Recorded, budget: int, *,
            seed: int = 0) -> list[Trial]:
    ctx = Context(cands, user=_user(cands), seed=seed, budget=budget)
    return drive(make(name, ctx), measure, budget=budget)


def _user(cands: list[RunConfig]) -> RunConfig:
    return next(rc for rc in cands if rc.schedule.policy == "pad-batch" and rc.parallel.dp == 2
                and rc.parallel.zero_stage == 0 and rc.schedule.micro_batch_size == 8
                and rc.checkpointing.policy == "none")


def test_deepspeed_style_binary_searches_the_micro_batch_per_stage() -> None:
    cands = _candidates()
    machine = Machine()
    trials = _search("deepspeed-style", cands, Recorded.measuring(machine), 20)
    got = [(t.rc.parallel.zero_stage, t.rc.schedule.micro_batch_size) for t in trials]
    # by hand: stage 0 over [1, 2, 4, 8]: mid 2 runs, mid 4 runs, 8 is OOM -> largest 4;
    # 2 is then no 5% gain, stop. Stage 3: 2, 4, 8 all run -> largest 8; 4 gains nothing.
    assert got == [(0, 2), (0, 4), (0, 8), (3, 2), (3, 4), (3, 8)]
    assert all(t.rc.schedule.policy == "pad-batch" and t.rc.parallel.dp == 2 for t in trials)
    best = max((t for t in trials if t.ok), key=lambda t: t.measurement.tokens_per_s)
    assert (best.rc.parallel.zero_stage, best.rc.schedule.micro_batch_size) == (3, 8)
    assert len(machine.calls) == len(set(machine.calls)) == 6


def test_deepspeed_style_stops_at_its_budget() -> None:
    cands = _candidates()
    trials = _search("deepspeed-style", cands, Recorded.measuring(Machine()), 4)
    assert len(trials) == 4


def test_strategies_share_measurements_but_count_their_own() -> None:
    cands = _candidates()
    machine = Machine()
    shared = Recorded.measuring(machine)
    first = _search("random", cands, shared, 12, seed=1)
    second = _search("random", cands, shared, 12, seed=1)
    assert len(first) == len(second) == 12
    assert len(machine.calls) == 12  # the second strategy's picks were all measured already
    third = _search("random", cands, shared, 12, seed=2)
    assert len(third) == 12 and len({config_key(t.rc) for t in third}) == 12
    assert len(machine.calls) == len(set(machine.calls)) == len(shared.known)


def test_every_candidate_is_one_set_of_optuna_parameters() -> None:
    cands = _candidates()
    enc = SpaceEncoding(cands)
    for rc in cands:
        assert enc.suggest(optuna.trial.FixedTrial(SpaceEncoding.params(rc))) is rc
    # every other combination of the choices breaks a validity rule: none is lost
    names = [k for k in enc.choices if k != "policy"]
    hit = set()
    for combo in itertools.product(*(enc.choices[k] for k in ["policy", *names])):
        params = dict(zip(["policy", *names], combo, strict=True))
        if params["layout"].startswith("dp1-"):
            params.pop("zero_stage")
        for k in set(SCHEDULE_KNOBS) - set(POLICY_KNOBS[params["policy"]]):
            params.pop(k, None)
        rc = enc.suggest(optuna.trial.FixedTrial(params))
        if rc is not None:
            hit.add(config_key(rc))
        else:
            assert not _valid(params)
    assert hit == {config_key(rc) for rc in cands}


def _valid(params: dict) -> bool:
    dp, tp, pp, cp = (int(x[2:]) for x in params["layout"].split("-"))
    sched = {k: params[k] for k in ("policy", "micro_batch_size", "micro_batch_tokens",
                                     "chunk_size", "chunkflow_k") if k in params}
    try:
        RunConfig.model_validate({"workload": WORKLOAD, "schedule": sched,
                                  "parallel": {"dp": dp, "tp": tp, "pp": pp, "cp": cp,
                                               "zero_stage": params.get("zero_stage", 0)},
                                  "checkpointing": {"policy": params["checkpointing"]}})
    except ValueError:
        return False
    return True


def test_tpe_spends_its_budget_on_distinct_valid_configs_and_is_repeatable() -> None:
    cands = _candidates()
    runs = []
    for _ in range(2):
        machine = Machine()
        trials = _search("tpe-measured", cands, Recorded.measuring(machine), 15, seed=3)
        assert len(trials) == 15 == len(set(machine.calls))
        assert all(t.rc in cands for t in trials)
        runs.append([config_key(t.rc) for t in trials])
    assert runs[0] == runs[1]  # seeded: a resumed run asks for the same configs again
