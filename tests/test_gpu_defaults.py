"""What autotune offers a GPU workload by default: the search space derived from the model,
data, memory and node layout; baselines and benchmark contenders that climb the memory ladder
until they fit, as users do; a measuring budget that scales with the predicted step. The CPU
defaults stay as they were."""

from __future__ import annotations

import pandas as pd
import pytest

from autotune.config import SearchSpace, Workload
from autotune.portfolio import baseline_configs, fitting_layout, memory_ladder


def _wl(preset: str = "llama3-8b", nodes: int = 1, cap: float = 80) -> Workload:
    return Workload.model_validate({
        "model": {"preset": preset},
        "data": {"preset": "longsft", "num_sequences": 1024, "max_len": 32768},
        "hardware": {"device": "cuda", "devices_per_node": 8, "nodes": nodes,
                     "device_name": "H100-SXM"},
        "budget": {"global_batch_tokens": 1048576, "memory_cap_gb": cap}})


def test_cpu_default_space_is_unchanged() -> None:
    assert SearchSpace.default_for(Workload()) == SearchSpace()


def test_gpu_space_follows_the_model_data_memory_and_nodes() -> None:
    space = SearchSpace.default_for(_wl())
    assert space.dtype == ["bf16"] and space.attention == ["varlen"]
    assert space.zero_stage == [0, 2, 3] and space.checkpointing == ["none", "selective", "full"]
    assert space.micro_batch_tokens == [1024, 2048, 4096, 8192, 16384, 32768]  # to the longest
    assert space.chunk_size == [1024, 2048, 4096, 8192, 16384]  # a chunk is shorter than it
    assert space.tp == [1, 2, 4, 8] and space.pp == [1]  # tp inside the node, one node
    assert set(space.loss) == {"full", "fused"} and set(space.compile) == {"none", "blocks"}
    big = SearchSpace.default_for(_wl("llama3-70b", nodes=8))
    assert big.pp == [1, 2, 4, 8] and big.tp == [1, 2, 4, 8]
    # Memory bounds the micro-batch: 8 GB holds far fewer 70B tokens than 32K.
    small = SearchSpace.default_for(_wl("llama3-70b", cap=8))
    assert max(small.micro_batch_tokens) < 32768


def test_memory_ladder_climbs_zero_then_checkpointing_then_fused_loss_then_tp_then_pp() -> None:
    rungs = [(r["parallel"].get("tp", 1), r["parallel"].get("pp", 1),
              r["parallel"]["zero_stage"], r["checkpointing"]["policy"],
              r.get("kernels", {}).get("loss", "full"))
             for r in memory_ladder(_wl("llama3-70b", nodes=2))]
    assert rungs[:6] == [(1, 1, 0, "none", "full"), (1, 1, 2, "none", "full"),
                         (1, 1, 3, "none", "full"), (1, 1, 3, "selective", "full"),
                         (1, 1, 3, "full", "full"), (1, 1, 3, "full", "fused")]
    assert rungs[6:] == [(2, 1, 3, "full", "fused"), (4, 1, 3, "full", "fused"),
                         (8, 1, 3, "full", "fused"), (8, 2, 3, "full", "fused")]


def test_a_rung_keeps_the_base_kernels_it_does_not_change() -> None:
    base = {"schedule": {"policy": "pack", "micro_batch_tokens": 4096},
            "kernels": {"attention": "varlen"}, "precision": {"dtype": "bf16"}}
    rc = fitting_layout(_wl(), base, lambda rc: rc.kernels.loss == "fused")
    assert (rc.kernels.attention, rc.kernels.loss, rc.parallel.tp) == ("varlen", "fused", 1)


def test_fitting_layout_takes_the_first_rung_that_fits_and_halves_padded_batches() -> None:
    wl = _wl()
    base = {"schedule": {"policy": "pad-batch", "micro_batch_size": 8},
            "precision": {"dtype": "bf16"}}
    rc = fitting_layout(wl, base, lambda rc: rc.parallel.zero_stage == 3
                        and rc.schedule.micro_batch_size <= 2)
    assert (rc.parallel.zero_stage, rc.checkpointing.policy, rc.schedule.micro_batch_size) == (
        3, "none", 2)
    assert fitting_layout(wl, base, None).parallel.zero_stage == 0  # nothing asked: plain dp


def test_cpu_baselines_stay_plain_data_parallelism() -> None:
    for rc in baseline_configs(Workload()):
        assert rc.parallel.dp == 1 and rc.precision.dtype == "fp32"


def test_gpu_baselines_and_suite_contenders_are_predicted_to_fit() -> None:
    from autotune.cli.predict_cmd import load_models
    from autotune.predict import StepPredictor, fits_in_memory
    from autotune.tune.strategies import MEMORY_MARGIN
    from suites.bench import CONTENDERS, contender_config, contender_fits, load_suite

    suite, _ = load_suite("h100x8-llama3-8b-longsft")
    wl = suite.workload
    models = load_models("prior", wl.hardware)
    fits = fits_in_memory(models, margin=MEMORY_MARGIN)
    configs = baseline_configs(wl, fits=fits) + [
        contender_config(name, wl, 1, suite.dtype, fits=fits) for name in CONTENDERS
        if name != "tuned"]
    assert contender_fits(wl) is not None  # what the suite itself asks
    peaks = StepPredictor(models).predict_many(configs).peak_mem_bytes
    assert (peaks <= wl.budget.memory_cap_gb * 2**30 * (1 - MEMORY_MARGIN)).all(), list(
        zip([rc.label() for rc in configs], peaks / 2**30))
    assert all(rc.precision.dtype == "bf16" and rc.kernels.attention == "varlen"
               for rc in configs)


def test_default_budget_scales_with_the_predicted_step() -> None:
    from autotune.tune.run import DEFAULT_BUDGET_S, TRIAL_START_S, default_budget_s

    wl = _wl()
    cap = wl.budget.memory_cap_gb * 2**30
    predicted = pd.DataFrame({"tokens_per_s": [3.0, 2.0, 1.0], "step_time_s": [10.0, 20.0, 1.0],
                              "peak_mem_bytes": [0.5 * cap, 0.5 * cap, 2 * cap]})
    # By hand: the two that fit have a median step of 15 s; 1 warm-up + 3 timed + 1 replay.
    want = 24 * (TRIAL_START_S["cuda"] + 5 * 15.0)
    assert default_budget_s(wl, predicted, 24, warmup=1, steps=3) == pytest.approx(want)
    tiny = predicted.assign(step_time_s=0.01)
    assert default_budget_s(Workload(), tiny, 2, warmup=1, steps=3) == DEFAULT_BUDGET_S
