"""The step model: composition against hand counts, the memory model against a known truth,
communication terms, the models folder's round trip and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autotune.config import RunConfig
from autotune.predict import StepPredictor
from cost_models.bundle import StepModels
from cost_models.family import ModelMismatch
from cost_models.features import Ceilings
from cost_models.step import (
    MEMORY_FEATURES,
    MemoryModel,
    ResidualModel,
    alpha_beta,
)

DIMS = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 96}
DATA = {"preset": "longsft", "num_sequences": 64, "max_len": 256, "seed": 0}
CEIL = Ceilings({"fp32": 1e10, "bf16": 2e10}, 1e10)


class _Const:
    """A family model that says every op takes ``seconds``: composition becomes counting."""

    kind, n_train = "const", 0

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def predict(self, rows: pd.DataFrame, ceilings: Ceilings) -> np.ndarray:
        return np.full(len(rows), self.seconds)


def _rc(**over) -> RunConfig:
    base = {"workload": {"model": DIMS, "data": DATA, "budget": {"global_batch_tokens": 1024}}}
    return RunConfig.model_validate(base | over)


def _models(families: dict | None = None) -> StepModels:
    return StepModels("fp", "cpu", CEIL, families or {})


def test_composition_counts_every_op_of_the_step() -> None:
    """With every op at 1 ms, the compute is 1 ms times the number of op runs, counted here
    from the plan by hand: per micro-batch and layer 7 matmuls, 1 attention (2 where a
    ChunkFlow chunk continues a sequence and packs others), 7 elementwise ops, each forward
    and backward, plus the loss forward and backward."""
    from autotune.data import global_batches, load_dataset, make_policy

    rc = _rc(schedule={"policy": "pack", "micro_batch_tokens": 256})
    dims = rc.workload.model.resolve()
    data = load_dataset(rc.workload.data, dims)
    stream = global_batches(data.lengths, global_batch_tokens=1024, seed=0)
    next(stream)
    plans = [make_policy(rc, dims, data_max_len=data.max_len).plan(data.lengths[next(stream)])
             for _ in range(3)]
    fams = {f: _Const(1e-3) for f in ("gemm", "attention", "norm", "loss", "optimizer")}
    out = StepPredictor(_models(fams), warmup=1, steps=3).predict_many([rc]).iloc[0]
    for fam, per_layer in (("gemm", 7), ("attention", 1), ("norm", 7)):
        runs = np.mean([2 * per_layer * dims.layers * sum(1 for _ in p.micro_batches())
                        for p in plans])
        assert out.breakdown[fam] == pytest.approx(runs * 1e-3)
    mbs = np.mean([sum(1 for _ in p.micro_batches()) for p in plans])
    assert out.breakdown["loss"] == pytest.approx(2 * mbs * 1e-3)
    assert out.breakdown["optimizer"] == pytest.approx(1e-3)
    assert out.composed_step_s == pytest.approx(sum(out.breakdown.values()))

    # full checkpointing runs every forward twice: +1 ms per forward op run
    ckpt = StepPredictor(_models(fams)).predict_many(
        [_rc(schedule={"policy": "pack", "micro_batch_tokens": 256},
             checkpointing={"policy": "full"})]).iloc[0]
    assert ckpt.breakdown["gemm"] == pytest.approx(1.5 * out.breakdown["gemm"])


def test_many_configs_in_one_call_match_one_at_a_time() -> None:
    rcs = [_rc(schedule={"policy": p, "micro_batch_tokens": 256, "chunk_size": 128},
               checkpointing={"policy": c},
               precision={"dtype": d})
           for p in ("pack", "sorted", "chunkflow") for c in ("none", "full") for d in ("fp32", "bf16")]
    many = StepPredictor(_models()).predict_many(rcs)
    one = pd.concat([StepPredictor(_models()).predict_many([rc]) for rc in rcs], ignore_index=True)
    np.testing.assert_allclose(many.step_time_s, one.step_time_s, rtol=1e-12)
    np.testing.assert_allclose(many.peak_mem_bytes, one.peak_mem_bytes, rtol=1e-12)
    assert (many.tokens_per_s > 0).all()


def test_data_parallel_and_tensor_parallel_add_their_collectives() -> None:
    fits = pd.DataFrame([{"collective": c, "ranks": 2, "alpha_s": 1e-3, "beta_s_per_byte": 1e-9}
                         for c in ("all_reduce", "all_gather", "reduce_scatter", "send_recv")])
    models = StepModels("fp", "cpu", CEIL, {}, fits)
    wl = {"model": DIMS, "data": DATA, "budget": {"global_batch_tokens": 1024},
          "hardware": {"devices_per_node": 2}}
    sched = {"policy": "pack", "micro_batch_tokens": 256}
    dims = _rc().workload.model.resolve()
    dp = StepPredictor(models).predict_many(
        [_rc(workload=wl, schedule=sched, parallel={"dp": 2})]).iloc[0]
    grad_bytes = dims.total_params() * 4
    assert dp.breakdown["comm_dp"] == pytest.approx(1e-3 + 1e-9 * grad_bytes)  # one bucket
    assert dp.breakdown["comm_tp"] == 0
    tp = StepPredictor(models).predict_many(
        [_rc(workload=wl, schedule=sched, parallel={"tp": 2})]).iloc[0]
    assert tp.breakdown["comm_tp"] > 0 and tp.breakdown["comm_dp"] == 0


def test_alpha_beta_falls_back_to_scaled_then_nominal_figures() -> None:
    fits = pd.DataFrame([{"collective": "all_reduce", "ranks": 2, "alpha_s": 1e-4,
                          "beta_s_per_byte": 1e-9}])
    assert alpha_beta("all_reduce", 2, fits) == (1e-4, 1e-9, "profiled")
    a, b, how = alpha_beta("all_reduce", 4, fits)
    assert (a, how) == (1e-4, "profiled on 2 ranks, scaled") and b == pytest.approx(1.5e-9)
    assert alpha_beta("all_gather", 2, fits)[2] == "nominal"
    assert alpha_beta("all_reduce", 1, fits) == (0.0, 0.0, "none")


def _peak_by_hand(units: pd.DataFrame, coef: dict, overhead: float) -> pd.Series:
    """A config's peak as an allocator would show it, written without the model: each unit's
    bytes feature by feature, rounded up to the 2 MiB segments the caching allocator hands
    out (a step the linear model cannot express), the largest unit per config."""
    out = {}
    for config, group in units.groupby("config"):
        best = 0.0
        for _, unit in group.iterrows():
            total = overhead
            for name in MEMORY_FEATURES:
                total += coef[name] * unit[name]
            best = max(best, np.ceil(total / 2**21) * 2**21)
        out[config] = best
    return pd.Series(out)


def test_memory_model_fits_noisy_peaks_of_an_independent_formula() -> None:
    """Peaks from a formula of their own (``_peak_by_hand``: allocator segments included)
    with 3% log-normal noise: the fit predicts held-out configs' peaks within 10% (median
    within 4%), and the two largest coefficients come back within 10%."""
    rng = np.random.default_rng(0)
    true = dict(zip(MEMORY_FEATURES, (1.0, 1.0, 1.6, 1.0, 0.7, 2.5, 1.2, 0.5)))
    units = pd.DataFrame(rng.uniform(0, 1e8, (600, len(MEMORY_FEATURES))), columns=MEMORY_FEATURES)
    units["config"] = np.repeat(np.arange(120), 5)
    truth = _peak_by_hand(units, true, 3e7) * rng.lognormal(0, 0.03, 120)
    train = truth.index % 4 != 0
    fitted = MemoryModel.fit(units[units.config.isin(truth.index[train])], truth[train], "fp")
    assert fitted.n_measurements == train.sum()
    held = truth.index[~train]
    err = np.abs(fitted.peak(units[units.config.isin(held)]) / truth[held] - 1)
    assert err.max() < 0.10 and err.median() < 0.04, err.describe()
    for name in ("attention_scores", "activations"):
        assert fitted.coef[name] == pytest.approx(true[name], rel=0.10), name


def _configs() -> list[RunConfig]:
    return [_rc(schedule={"policy": p, "micro_batch_tokens": m, "chunk_size": 64},
                checkpointing={"policy": c}, precision={"dtype": d})
            for p in ("pack", "sorted", "chunkflow") for m in (128, 512)
            for c in ("none", "full") for d in ("fp32", "bf16")]


def _step_by_hand(rc: RunConfig, tokens: float, padding: float, micro_batches: float,
                  lengths: np.ndarray) -> float:
    """A machine's step time written without the step model: the trainer's own FLOP count
    (autotune.train.flops: matmuls and causal attention over the data's sequences, scaled to
    the tokens of one step and its padding; x 4/3 when full checkpointing runs the forward
    again) at 0.6 GFLOP/s in fp32 and 0.15 in bf16 (a host without native bf16), 3 ms per
    micro-batch and 20 ms per step."""
    from autotune.train.flops import model_flops

    flops = model_flops(rc.workload.model.resolve(), lengths) * tokens / lengths.sum()
    flops /= 1 - padding
    flops *= 4 / 3 if rc.checkpointing.policy == "full" else 1.0
    speed = 0.15e9 if rc.precision.dtype == "bf16" else 0.6e9
    return flops / speed + 3e-3 * micro_batches + 0.02


def test_calibration_predicts_an_independent_machine() -> None:
    """Steps of 24 configs from ``_step_by_hand`` with 5% noise: calibrated on three in four,
    the held-out configs are predicted within 15% (median within 8%), where the uncalibrated
    prior is off by more than 2x."""
    from autotune.data import load_lengths

    configs = _configs()
    comp, _ = StepPredictor(_models()).compose(configs)
    lengths = load_lengths(configs[0].workload.data, configs[0].workload.model.resolve()).lengths
    rng = np.random.default_rng(0)
    measured = np.array([
        _step_by_hand(rc, row.tokens_per_step, row.padding_fraction,
                      np.exp(row.log_micro_batches), lengths)
        for rc, row in zip(configs, comp.itertuples(), strict=True)]) * rng.uniform(0.95, 1.05, len(configs))
    train = np.arange(len(comp)) % 4 != 0
    model = ResidualModel.fit(comp[train], measured[train], "fp", trees=False)
    err = np.abs(model.predict(comp[~train]) / measured[~train] - 1)
    assert err.max() < 0.15 and np.median(err) < 0.08, err
    prior = comp.composed_step_s.to_numpy()[~train] / measured[~train]
    assert np.median(np.maximum(prior, 1 / prior)) > 2.0
    assert ResidualModel.fit(comp.head(3), measured[:3], "fp").coef is None  # too few: prior


def test_models_round_trip_and_refuse_another_machine(tmp_path: Path) -> None:
    comp, _ = StepPredictor(_models()).compose(_configs())
    rng = np.random.default_rng(1)
    measured = comp["composed_step_s"].to_numpy() * rng.uniform(1.2, 2.0, len(comp))
    residual = ResidualModel.fit(pd.concat([comp] * 2), np.concatenate([measured] * 2), "fp")
    assert residual.booster is not None  # enough rows for the tree layer
    memory = MemoryModel("fp", dict.fromkeys(MEMORY_FEATURES, 1.3), 1e6, 12)
    models = StepModels("fp", "cpu", CEIL, {}, None, residual, memory)
    models.save(tmp_path)
    again = StepModels.load(tmp_path, "fp")
    rcs = [_rc(schedule={"policy": "pack", "micro_batch_tokens": 256}),
           _rc(schedule={"policy": "chunkflow", "chunk_size": 64, "micro_batch_tokens": 128})]
    a, b = StepPredictor(models).predict_many(rcs), StepPredictor(again).predict_many(rcs)
    np.testing.assert_allclose(a.step_time_s, b.step_time_s, rtol=1e-6)
    np.testing.assert_allclose(a.peak_mem_bytes, b.peak_mem_bytes, rtol=1e-12)
    assert again.calibration == "measured" and again.residual.n_measurements == 2 * len(comp)

    with pytest.raises(ModelMismatch, match="fingerprint fp, this machine is other"):
        StepModels.load(tmp_path, "other")
    manifest = json.loads((tmp_path / "models.json").read_text())
    (tmp_path / "models.json").write_text(json.dumps(manifest | {"feature_version": 0}))
    with pytest.raises(ModelMismatch, match="feature version 0"):
        StepModels.load(tmp_path, "fp")
    with pytest.raises(ModelMismatch, match="run `autotune fit"):
        StepModels.load(tmp_path / "nothing", "fp")


def test_fused_loss_prices_the_same_time_and_one_chunk_of_logits() -> None:
    """The fused loss's memory counts one chunk of float32 logits and the two gradients, on
    the scale where full logits count T x V x 8 bytes; its time is the unfused loss's."""
    dims = {**DIMS, "vocab": 4096}
    base = {"workload": {"model": dims, "data": DATA, "budget": {"global_batch_tokens": 1024}},
            "schedule": {"policy": "pack", "micro_batch_tokens": 512}}
    full = RunConfig.model_validate(base)
    fused = RunConfig.model_validate(
        base | {"kernels": {"loss": "fused", "configs": {"linear_ce": {"chunk_tokens": 128}}}})
    pred = StepPredictor(_models())
    comp, units = pred.compose([full, fused])
    frame = StepPredictor.unit_frame(units)
    t = frame[frame.config == 0].logits.to_numpy() / (4096 * 8)  # each unit's tokens
    assert t.min() > 128  # the chunk is smaller than every unit: the cut shows
    h = dims["hidden"]
    by_hand = (np.minimum(t, 128) * 4096 * 4 + (t * h + 4096 * h) * 4) * 2 / 3
    np.testing.assert_allclose(frame[frame.config == 1].logits.to_numpy(), by_hand, rtol=1e-12)
    np.testing.assert_allclose(comp.composed_step_s[0], comp.composed_step_s[1], rtol=1e-12)
    peaks = pred.predict_many([full, fused]).peak_mem_bytes
    assert peaks[1] < peaks[0]
