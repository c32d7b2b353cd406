"""Optuna studies on the predictions, checked against pricing every candidate exactly."""

from __future__ import annotations

import numpy as np
import optuna

from autotune.config import SearchSpace, Workload
from autotune.predict import StepPredictor
from autotune.propose import SpaceEncoding, pareto_front, propose, space_size
from cost_models.bundle import StepModels
from cost_models.features import Ceilings

WORKLOAD = Workload.model_validate({
    "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 96},
    "data": {"preset": "longsft", "num_sequences": 128, "max_len": 512, "seed": 0},
    "hardware": {"devices_per_node": 2},
    "budget": {"global_batch_tokens": 2048},
})
SPACE = SearchSpace(policy=["pad-batch", "sorted", "pack", "chunkflow", "skrull"],
                    micro_batch_tokens=[128, 256, 512, 1024], chunk_size=[64, 128],
                    micro_batch_size=[1, 2, 4, 8], zero_stage=[0, 3],
                    checkpointing=["none", "selective", "full"])
MODELS = StepModels("fp", "cpu", Ceilings({"fp32": 1e10, "bf16": 2e10}, 1e10))


def test_space_size_by_hand() -> None:
    space = SearchSpace(policy=["pack"], micro_batch_tokens=[1024, 2048],
                        checkpointing=["none", "full"], zero_stage=[0, 3])
    # layouts dp2 (x2 stages), tp2, pp2 -> 4 (cp is opt-in: SearchSpace.cp defaults to [1]);
    # 2 micro-batch sizes; 2 checkpointings
    assert space_size(space, WORKLOAD) == 16
    assert len(list(space.grid(WORKLOAD))) <= 16
    assert space_size(SPACE, WORKLOAD) >= len(list(SPACE.grid(WORKLOAD)))


def test_an_open_encoding_builds_exactly_the_grid() -> None:
    grid = list(SPACE.grid(WORKLOAD))
    enc = SpaceEncoding(space=SPACE, workload=WORKLOAD)
    for rc in grid:
        got = enc.suggest(optuna.trial.FixedTrial(SpaceEncoding.params(rc)))
        assert got is not None and got.model_dump_json() == rc.model_dump_json()
    # combinations the rules refuse are None: every combination of the choices, checked
    # against the grid
    seen = set()
    rng = np.random.default_rng(1)
    for _ in range(300):
        trial = optuna.trial.FixedTrial({k: v[int(rng.integers(len(v)))]
                                         for k, v in enc.choices.items()})
        built = enc.suggest(trial)
        if built is not None:
            seen.add(built.model_dump_json())
    assert seen <= {rc.model_dump_json() for rc in grid}


def test_pareto_front_matches_the_definition() -> None:
    rng = np.random.default_rng(0)
    pts = [tuple(p) for p in rng.uniform(0, 1, (300, 2))]
    front = set(pareto_front(pts))
    brute = {i for i, (a, b) in enumerate(pts)
             if not any(c >= a and d <= b and (c, d) != (a, b) for c, d in pts)}
    assert front == brute


def test_tpe_on_predictions_finds_the_exact_best_and_nsga_the_front() -> None:
    grid = list(SPACE.grid(WORKLOAD))
    predictor = StepPredictor(MODELS)
    exact = predictor.predict_many(grid)
    cap = float(np.quantile(exact.peak_mem_bytes, 0.8)) / 0.9  # some candidates do not fit
    fits = exact.peak_mem_bytes <= cap * 0.9
    best = float(exact.tokens_per_s[fits].max())
    enc = SpaceEncoding(space=SPACE, workload=WORKLOAD)
    top = propose(enc, predictor, trials=600, keep=10, cap_bytes=cap, seed=0)
    got = predictor.predict_many(top)
    assert (got.peak_mem_bytes <= cap * 0.9).all()
    assert float(got.tokens_per_s.max()) >= 0.97 * best  # within 3% of exact pricing

    front_exact = {grid[i].model_dump_json() for i in pareto_front(
        list(zip(exact.tokens_per_s[fits], exact.peak_mem_bytes[fits], strict=True)))
        for i in [int(np.flatnonzero(fits.to_numpy())[i])]}
    proposed = propose(SpaceEncoding(grid), predictor, trials=1500, keep=len(grid),
                       cap_bytes=cap, pareto=True, seed=0)
    head = {rc.model_dump_json() for rc in proposed[:len(front_exact)]}
    assert len(head & front_exact) >= 0.8 * len(front_exact)
