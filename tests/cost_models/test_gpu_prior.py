"""The GPU prior against hand computations from its cited figures, collectives against
nccl-tests' bus-bandwidth formula, and each overlap rule on a hand-built two-layer step.

Tolerances: hand values repeat the physics with the cited constant (1e-9 relative: the
same arithmetic in another order); the eager byte counts are hand counts of the trainer's
elementwise code (1%: the per-row statistics are the only terms left out of the hand count).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from autotune.config import RunConfig
from autotune.predict import StepPredictor, datasheet_models
from autotune.step_comm import StepShape, gpu_comm, mesh_groups
from autotune.step_ops import EAGER_OPS, count_eager_traffic, eager_traffic, op_case
from cost_models.gpu_prior import DATA, CollectivePrior, Group, OpPrior

H100_PEAK, H100_HBM, H100_SMS = 989.4e12, 3350e9, 132
LAUNCH = 4.3e-6  # overhead.csv: the one cited launch floor (28.3 - 24 us on a B200)


def _table(name: str) -> pd.DataFrame:
    return pd.read_csv(DATA / name)


def test_gemm_4096_cubed_bf16_on_h100_at_the_cited_efficiency() -> None:
    prior = OpPrior.for_device("H100-SXM")
    # the cited figures: MAMF 794.5 TFLOPS at 2048x2048x13312 and 792.1 at 6144x17920x2816
    gemm = _table("gemm.csv")
    cited = gemm[(gemm.device == "H100-SXM") & (gemm.dtype == "bf16")]
    assert sorted(cited.tflops) == [792.1, 794.5]
    # by hand: at 2048 x 2048 the 128-wide tiles make 256 tiles on 132 SMs (2 waves, 97%),
    # at 6144 x 17920 6720 tiles in 51 waves; the efficiency is the median of the two
    eff = np.median([794.5e12 / (H100_PEAK * 256 / 264), 792.1e12 / (H100_PEAK * 6720 / (51 * 132))])
    assert prior.gemm["bf16"].value == pytest.approx(eff, rel=1e-9)
    # 4096^3: 1024 tiles in 8 waves of 132 (1024 / 1056 busy)
    e = prior.gemm["bf16"].value
    hand = 2 * 4096**3 / (H100_PEAK * e * 1024 / 1056) + LAUNCH
    assert prior.gemm_seconds(4096, 4096, 4096, "bf16")[()] == pytest.approx(hand, rel=1e-9)
    # a skinny one reads its weight at HBM speed: memory-bound, far below peak
    skinny = prior.gemm_seconds(16, 4096, 4096, "bf16")[()]
    assert skinny == pytest.approx((16 * 4096 * 2 + 4096 * 4096) * 2 / H100_HBM + LAUNCH, rel=1e-9)
    assert 2 * 16 * 4096**2 / skinny < 0.05 * H100_PEAK


def test_gemm_backward_is_its_two_gemms() -> None:
    prior = OpPrior.for_device("A100-SXM-80GB")
    rows = pd.DataFrame([op_case(("gemm", "linear", p, "bf16", (("m", 8192), ("k", 4096), ("n", 14336))))
                         for p in ("fwd", "bwd")])
    fwd, bwd = prior.seconds(rows, "gemm")
    assert fwd == pytest.approx(prior.gemm_seconds(8192, 14336, 4096, "bf16")[()], rel=1e-12)
    assert bwd == pytest.approx(prior.gemm_seconds(8192, 4096, 14336, "bf16")[()]
                                + prior.gemm_seconds(4096, 14336, 8192, "bf16")[()], rel=1e-12)


def test_a100_efficiency_comes_from_the_random_data_figure() -> None:
    # Horace He's randn 8192^3: 257 TFLOPS of 312 (4096 tiles, 38 waves of 108)
    e = OpPrior.for_device("A100-SXM-80GB").gemm["bf16"].value
    assert e == pytest.approx(257 / (312 * 4096 / (38 * 108)), rel=1e-9)


def test_attention_forward_and_backward_from_the_fa2_figures() -> None:
    prior = OpPrior.for_device("H100-SXM")
    att = _table("attention.csv")
    h = att[(att.device == "H100-SXM") & (att.kernel == "fa2") & (att.causal == 1) & (att.head_dim == 128)
            & (att.seqlen == 8192)]
    fwd_tf = h[h["pass"] == "fwd"].tflops.median() * 1e12
    fb_tf = h[h["pass"] == "fwd_bwd"].tflops.median() * 1e12
    # backward: what fwd+bwd leaves once the forward's time is taken out (bwd = 2.5 fwd)
    bwd_tf = 2.5 / (3.5 / fb_tf - 1 / fwd_tf)
    heads, d, n = 32, 128, 8192
    flops = 4.0 * n * (n + 1) / 2 * heads * d
    rows = pd.DataFrame([op_case(("attention", "varlen", p, "bf16",
                                  (("heads", heads), ("kv_heads", 8), ("head_dim", d), ("impl", "sdpa"),
                                   ("seqlens", (n,))))) for p in ("fwd", "bwd")])
    fwd, bwd = prior.seconds(rows, "attention", impl="sdpa")
    assert fwd == pytest.approx(flops / fwd_tf + LAUNCH, rel=1e-9)
    assert bwd == pytest.approx(2.5 * flops / bwd_tf + LAUNCH, rel=1e-9)
    # a pack of short sequences runs each at its own length's (lower) throughput
    short = pd.DataFrame([op_case(("attention", "varlen", "fwd", "bf16",
                                   (("heads", heads), ("kv_heads", 8), ("head_dim", d), ("impl", "sdpa"),
                                    ("seqlens", (512,) * 16))))])
    per_token_short = prior.seconds(short, "attention")[0] / (16 * 512 * 512)
    assert per_token_short > fwd / (n * n)


def test_eager_rms_norm_moves_what_its_code_moves() -> None:
    # x.float() r2 w4, pow r4 w4, mean r4, * rsqrt r4 w4, .type_as r4 w2, * weight r2 w2:
    # 36 bytes per element (bf16), plus per-row statistics
    kernels, per_element = count_eager_traffic("rms_norm", "bf16", "fwd")
    assert kernels == 8
    assert per_element == pytest.approx(36, rel=0.01)
    prior = OpPrior.for_device("H100-SXM")
    frac = prior.bandwidth["rms_norm"].value
    assert frac == pytest.approx(3000 / 3350, rel=1e-9)  # QuACK: ~3 TB/s for rms_norm
    rows = pd.DataFrame([op_case(("norm", "rms_norm", "fwd", "bf16", (("tokens", 16384), ("width", 4096))))])
    eager = prior.seconds(rows, "norm")[0]
    fused = prior.seconds(rows, "norm", compiled=True)[0]
    assert eager == pytest.approx(16384 * 4096 * per_element / (H100_HBM * frac) + 8 * LAUNCH, rel=1e-9)
    assert fused == pytest.approx(16384 * 4096 * 2 * 2 / (H100_HBM * frac) + LAUNCH, rel=1e-9)


def test_the_kept_eager_counts_are_the_trainer_codes_counts() -> None:
    for op in EAGER_OPS:
        for dt in ("bf16", "fp32"):
            for p in ("fwd", "bwd"):
                assert eager_traffic(op, dt, p) == count_eager_traffic(op, dt, p), (op, dt, p)


def test_loss_and_optimizer_by_hand() -> None:
    prior = OpPrior.for_device("H100-SXM")
    t, h, v = 8192, 4096, 128256
    rows = pd.DataFrame([op_case(("loss", "lm_head_ce", "fwd", "bf16",
                                  (("tokens", t), ("hidden", h), ("vocab", v))))])
    _, per_logit = eager_traffic("cross_entropy", "bf16", "fwd")
    ce = t * v * per_logit / (H100_HBM * prior.bandwidth["cross_entropy"].value) + 4 * LAUNCH
    assert prior.seconds(rows, "loss")[0] == pytest.approx(prior.gemm_seconds(t, v, h, "bf16")[()] + ce,
                                                           rel=1e-9)
    opt = pd.DataFrame([op_case(("optimizer", "adamw", "step", "fp32",
                                 (("numel", 10**9), ("tensors", 291), ("foreach", True))))])
    # AdamW reads param, grad and both moments and writes param and moments: 7 x 4 bytes
    assert prior.seconds(opt, "optimizer")[0] == pytest.approx(
        28e9 / (H100_HBM * prior.bandwidth["adamw"].value) + LAUNCH, rel=1e-9)


def test_power_limit_slows_compute_more_than_memory() -> None:
    capped = OpPrior.for_device("H100-SXM-96GB-HBM2e")
    full = OpPrior.for_device("H100-SXM")
    # (500 / 700) ** a, a fitted on the cited 600 W figures: 0.85-0.90 of the throughput
    # of BF16 training, 0.92-0.95 of memory-bound inference
    a = np.median(np.log([0.85, 0.90]) / math.log(600 / 700))
    ratio = capped.gemm_seconds(8192, 8192, 8192, "bf16") / full.gemm_seconds(8192, 8192, 8192, "bf16")
    launch_share = LAUNCH / full.gemm_seconds(8192, 8192, 8192, "bf16")
    assert ratio == pytest.approx((500 / 700) ** -a, rel=1e-3 + launch_share)
    assert capped.power_memory.value < capped.power.value


# ---- collectives ----------------------------------------------------------------------------
def test_collectives_follow_nccl_tests_bus_bandwidth() -> None:
    c = CollectivePrior.for_device("H100-SXM")
    size = 2**30
    hop = c.intra["all_gather"][1]
    # all-gather inside a node: time = latency + size x (n-1)/n / busbw (361.4 GB/s, H200
    # node table, same NVLink 4 switch)
    t = c.seconds("all_gather", size, Group(8, 8))
    assert t == pytest.approx(7 * hop + size * 7 / 8 / 361.4e9, rel=1e-9)
    # all-reduce: the factor is 2(n-1)/n, at NVLS's 480 GB/s inside a node
    t = c.seconds("all_reduce", size, Group(8, 8))
    assert t == pytest.approx(14 * c.intra["all_reduce"][1] + size * 2 * 7 / 8 / 480e9, rel=1e-9)
    # one rank per node over 32 nodes: the ring runs at one NIC (400 Gb/s) at the cited
    # multi-node efficiency (380 GB/s over 8 NICs), latency per step across nodes
    eff = 380 / (8 * 50)
    assert c.inter_efficiency == pytest.approx(eff, rel=1e-9)
    t = c.seconds("reduce_scatter", size, Group(32, 1))
    assert t == pytest.approx(31 * c.inter_latency_s + size * 31 / 32 / (50e9 * eff), rel=1e-9)
    # the cited 2-node, 1-GPU-per-node 8-byte all-reduce: 19.90 us over 2 ring steps
    assert c.inter_latency_s == pytest.approx(19.90e-6 / 2, rel=1e-9)


def test_all_reduce_across_many_nodes_takes_the_tree_latency() -> None:
    c = CollectivePrior.for_device("A100-SXM-80GB")
    g = Group(64, 1)
    ring = 2 * 63 * c.inter_latency_s
    tree = 2 * math.log2(64) * c.inter_latency_s + 2 * c.intra["all_reduce"][1]
    assert c.seconds("all_reduce", 8, g) == pytest.approx(min(ring, tree) + 8 * 2 * 63 / 64
                                                          / (25e9 * c.inter_efficiency), rel=1e-9)


def test_mesh_groups_place_tp_inside_a_node() -> None:
    rc = _rc(dp=32, tp=8, devices_per_node=8, nodes=32, heads=16)
    g = mesh_groups(rc)
    assert g["tp"] == Group(8, 8) and g["dp"] == Group(32, 1) and g["dp"].nodes == 32
    rc = _rc(dp=16, tp=1, devices_per_node=8, nodes=2)
    assert mesh_groups(rc)["dp"] == Group(16, 8)


# ---- overlap rules on a hand-built two-layer step ---------------------------------------------
class _FlatPrior:
    """Collectives at 1 GB/s of bus bandwidth, no latency: hand arithmetic stays simple."""

    device, source = "flat", "test"

    def seconds(self, collective: str, nbytes: float, group: Group) -> np.ndarray:
        from profilers.collectives import bus_factor

        if group.ranks <= 1:
            return np.zeros_like(np.asarray(nbytes, float))
        name = collective if collective != "send_recv" else "send_recv"
        return np.asarray(nbytes, float) * bus_factor(name, group.ranks) / 1e9


def _rc(**kw: object) -> RunConfig:
    world = kw.get("dp", 1) * kw.get("tp", 1) * kw.get("pp", 1)
    per_node, nodes = kw.pop("devices_per_node", min(world, 8)), kw.pop("nodes", max(1, world // 8))
    heads = kw.pop("heads", 4)
    return RunConfig.model_validate({
        "workload": {"model": {"layers": 2, "hidden": 64, "heads": heads, "kv_heads": heads // 2 or 1,
                               "ffn": 128, "vocab": 256},
                     "hardware": {"device": "cuda", "device_name": "H100-SXM",
                                  "devices_per_node": per_node, "nodes": nodes},
                     "data": {"preset": "fixed", "max_len": 64, "num_sequences": 64},
                     "budget": {"global_batch_tokens": 512}},
        "schedule": {"policy": "pack", "micro_batch_tokens": 128, "chunk_size": 64},
        "precision": {"dtype": "bf16"},
        "parallel": {k: v for k, v in kw.items()}})


def _comm(rc: RunConfig, st: StepShape):  # noqa: ANN202
    models = datasheet_models("H100-SXM")
    models.collective_prior = _FlatPrior()
    models.op_prior = None  # no FSDP copy kernels: the overlap rules alone
    pred = StepPredictor(models)
    return gpu_comm(models, pred._alpha_beta, rc, rc.workload.model.resolve(), st)[0]


def _sizes(rc: RunConfig) -> tuple[float, float]:
    """(parameters per block, outside the blocks) of the two-layer model."""
    d = rc.workload.model.resolve()
    root = 2 * d.vocab * d.hidden + d.hidden
    return (d.total_params() - root) / d.layers, root


def test_fsdp_gathers_hide_behind_compute_but_the_first() -> None:
    rc = _rc(dp=8, zero_stage=3)
    block, root = _sizes(rc)
    ag = lambda n: n * 2 * 7 / 8 / 1e9  # noqa: E731 - bf16 gathers
    rs = lambda n: n * 4 * 7 / 8 / 1e9  # noqa: E731 - float32 reductions
    # plenty of compute: only the root's gather and the last two reductions show
    st = StepShape(compute_s=3.0, forward_s=1.0, micro_batches=1, padded_tokens=128, layers=2, ckpt=0,
               act_bytes=2)
    c = _comm(rc, st)
    assert c.dp_s == pytest.approx(2 * (2 * ag(block) + ag(root)) + 2 * rs(block) + rs(root), rel=1e-9)
    assert c.dp_exposed_s == pytest.approx(ag(root) + rs(root) + rs(block), rel=1e-9)
    # no compute to hide behind: every gather and reduction shows
    st0 = StepShape(1e-12, 5e-13, 1, 128, 2, 0, 2)
    c0 = _comm(rc, st0)
    assert c0.dp_exposed_s == pytest.approx(
        ag(root) + 2 * ag(block) + 2 * ag(block) + 2 * rs(block) + rs(root) + rs(root) + rs(block)
        - 1e-12, rel=1e-6)


def test_ddp_all_reduce_hides_behind_the_last_backward() -> None:
    rc = _rc(dp=8, zero_stage=0)
    d = rc.workload.model.resolve()
    total = d.total_params() * 4 * 2 * 7 / 8 / 1e9  # one bucket: the model is 25 MB at most
    st = StepShape(compute_s=3.0, forward_s=1.0, micro_batches=2, padded_tokens=256, layers=2, ckpt=0,
               act_bytes=2)
    c = _comm(rc, st)
    assert c.dp_s == pytest.approx(total, rel=1e-9)
    assert c.dp_exposed_s == pytest.approx(total, rel=1e-9)  # one bucket: nothing to overlap
    assert c.exposed_s == pytest.approx(total, rel=1e-9)


def test_tensor_parallel_all_reduces_are_on_the_critical_path() -> None:
    rc = _rc(tp=2)
    st = StepShape(compute_s=3.0, forward_s=1.0, micro_batches=2, padded_tokens=256, layers=2, ckpt=1,
               act_bytes=2)
    c = _comm(rc, st)
    per_call = 128 * 64 * 2 * 2 * 1 / 2 / 1e9  # a micro-batch's activations, 2(n-1)/n = 1
    # per micro-batch: 2 forward and 2 backward per layer, 2 more per checkpointed layer
    assert c.tp_s == pytest.approx(2 * (4 * 2 + 2 * 1) * per_call, rel=1e-9)
    assert c.exposed_s == pytest.approx(c.tp_s, rel=1e-9)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_bubble_is_pp_minus_one_micro_batches(schedule: str) -> None:
    rc = _rc(pp=2, pp_schedule=schedule)
    st = StepShape(compute_s=4.0, forward_s=1.0, micro_batches=4, padded_tokens=512, layers=1, ckpt=0,
               act_bytes=2)
    c = _comm(rc, st)
    assert c.bubble_s == pytest.approx((2 - 1) * 4.0 / 4, rel=1e-12)
    # each micro-batch sends its activations forward and their gradient back
    assert c.pp_s == pytest.approx(2 * 4 * 128 * 64 * 2 / 1e9, rel=1e-9)


def test_cpu_configs_keep_the_measured_composition() -> None:
    # the CPU step model adds communication to compute (gloo shares the cores)
    from cost_models.bundle import StepModels
    from cost_models.features import Ceilings

    rc = RunConfig.model_validate({"workload": {"hardware": {"devices_per_node": 2}},
                                   "parallel": {"dp": 2}})
    models = StepModels("fp", "cpu", Ceilings({"fp32": 1e10, "bf16": 1e10}, 1e10))
    row = StepPredictor(models).predict_many([rc]).iloc[0]
    parts = row["breakdown"]
    assert row["composed_step_s"] == pytest.approx(sum(parts.values()), rel=1e-9)
    assert row["overlapped_s"] == 0.0


def test_predict_prices_a_gpu_config_from_the_prior_with_sources_and_spread() -> None:
    rc = _rc(dp=8, zero_stage=3)
    p = StepPredictor(datasheet_models("H100-SXM")).predict(rc)
    assert p.spread["step_time_s_low"] <= p.step_time_s <= p.spread["step_time_s_high"]
    assert p.spread["tokens_per_s_low"] <= p.tokens_per_s <= p.spread["tokens_per_s_high"]
    assert "stas_mamf" in p.sources["gpu_prior.gemm.bf16"]
    assert "collective prior" in p.sources["comm_dp"]
    composed = sum(v for k, v in p.breakdown.items() if k != "residual")
    assert p.step_time_s == pytest.approx(composed, rel=1e-9)


def test_a_collective_profile_overrides_the_prior() -> None:
    rc = _rc(dp=8, zero_stage=3)
    models = datasheet_models("H100-SXM")
    models.collective_fits = pd.DataFrame({"collective": ["all_gather", "reduce_scatter"],
                                           "ranks": [8, 8], "alpha_s": [1e-3, 1e-3],
                                           "beta_s_per_byte": [1e-9, 2e-9]})
    block, root = _sizes(rc)
    st = StepShape(compute_s=1e-12, forward_s=5e-13, micro_batches=1, padded_tokens=128, layers=2, ckpt=0,
               act_bytes=2)
    c = gpu_comm(models, StepPredictor(models)._alpha_beta, rc, rc.workload.model.resolve(), st)[0]
    ag = lambda n: 1e-3 + n * 2 * 1e-9  # noqa: E731 - the fit, bf16 gathers
    rs = lambda n: 1e-3 + n * 4 * 2e-9  # noqa: E731 - float32 reductions
    assert c.dp_s == pytest.approx(2 * (2 * ag(block) + ag(root)) + 2 * rs(block) + rs(root), rel=1e-9)
