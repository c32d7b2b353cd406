"""The GPU prior: what each op family takes on a GPU this project does not have, from public
measurements kept as data files with their sources (``cost_models/data/gpu/``, see its
SOURCES.md), and what each collective takes over the node's links.

Per family, one physical form whose few constants are fitted on the cited figures of that
device (or, where a device has none, named and borrowed from one that has):

- gemm: max(FLOPs / (peak x efficiency x wave occupancy), bytes / HBM bandwidth) plus the
  launch floor. Wave occupancy is the last wave's idle SMs (128 x 128 output tiles over the
  SM count), the memory term what bounds skinny matmuls; the efficiency is fitted on the
  device's cited GEMM figures (median log error), and the spread of the figures around the
  fit gives the low and high prediction. Backward is the two GEMMs it runs (input and weight
  gradients), each with its own output shape.
- attention: FlashAttention's published throughput against sequence length and head dim,
  forward and backward apart, causal work halved as its benchmarks count it; a packed
  micro-batch is priced per sequence at that sequence's length.
- norm and elementwise ops, the loss's softmax, the optimizer: bytes at the cited fraction
  of HBM bandwidth that such kernels reach, plus one launch floor per kernel. Eager ops move
  what the trainer's own unfused code moves (``autotune.step_ops.eager_traffic``); a
  compiled block, or a fused kernel, the analytic bytes.

Collectives (``CollectivePrior``): nccl-tests' bus bandwidth inside a node (NVLink /
NVSwitch, fitted plateau per collective) and across nodes (the NICs of the group's members
on each node, at the efficiency the cited multi-node runs reach), with ring and tree latency
terms; time = latency + bytes x bus factor / bus bandwidth, as nccl-tests defines it.

A measured profile of the real device always overrides this: the predictor only falls back
to the prior for families (and collectives) the loaded models do not cover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from profilers.collectives import bus_factor

__all__ = ["DATA", "CollectivePrior", "Group", "OpPrior"]

DATA = Path(__file__).resolve().parent / "data" / "gpu"
TILE = 128  # output tile side for wave occupancy: cuBLAS's common 128-wide CTA tiles
# Devices without figures of their own borrow from one that has, for compute-bound families
# only (the same die and clocks); bandwidth-bound families keep their own HBM figure.
_SAME_COMPUTE = {"H200": "H100-SXM", "H100-SXM-96GB-HBM2e": "H100-SXM",
                 "A100-SXM-40GB": "A100-SXM-80GB", "A100-PCIe": "A100-SXM-80GB",
                 "A100-PCIe-40GB": "A100-SXM-80GB"}


def _compute_group(device: str) -> list[str]:
    """Devices with the same die and clocks as ``device`` (its GEMM and attention figures
    are one population): ``device`` first."""
    root = _SAME_COMPUTE.get(device, device)
    return [device] + [d for d in [root, *(k for k, v in _SAME_COMPUTE.items() if v == root)]
                       if d != device]
_ATTENTION_KERNEL = {"sdpa": "fa2", "varlen": "fa2", "flex": "flex", "triton": "fa2",
                     "blocked": "fa2", "eager": "eager"}
_QUANTILES = (0.1, 0.9)  # the spread: 10th and 90th percentile of figures around the fit


@cache
def _table(name: str) -> pd.DataFrame:
    path = DATA / name
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def _spread(ratio: np.ndarray) -> tuple[float, float]:
    """Low and high multipliers of predicted time from measured / predicted ratios."""
    if len(ratio) < 3:
        return 1.0, 1.0
    lo, hi = np.quantile(ratio, _QUANTILES)
    return float(min(lo, 1.0)), float(max(hi, 1.0))


@dataclass(frozen=True)
class _Fit:
    value: float  # the fitted constant (an efficiency or a fraction of bandwidth)
    low: float  # time multipliers at the spread's ends
    high: float
    points: int
    source: str  # which device's figures and which sources


@dataclass(frozen=True)
class OpPrior:
    """One GPU's op prior. ``quantile`` 'mid' prices at the fit, 'low' and 'high' at the
    spread's ends (the fast and the slow side)."""

    device: str
    peak: dict  # dtype -> dense FLOP/s
    hbm_bytes_per_s: float
    sms: int
    gemm: dict  # dtype -> _Fit (efficiency)
    bandwidth: dict  # op class -> _Fit (fraction of HBM bandwidth)
    launch_s: float
    launch_source: str
    attention: pd.DataFrame  # kernel, pass, causal, head_dim, seqlen, tflops, source
    attention_fit: _Fit  # the attention figures' spread and where they came from
    power: _Fit | None = None  # time multiplier of compute-bound kernels under a power limit
    power_memory: _Fit | None = None  # and of memory-bound ones
    quantile: str = "mid"
    curves: dict = field(default_factory=dict, compare=False, repr=False)  # attention, by key

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def for_device(cls, name: str) -> OpPrior:
        from profilers.ceilings import datasheet

        row = datasheet(name)
        if row is None:
            raise ValueError(f"no datasheet row for GPU {name!r}")
        return _build(row.name)

    def at(self, quantile: str) -> OpPrior:
        return replace(self, quantile=quantile)

    def _mult(self, fit: _Fit, *, memory: bool = False) -> float:
        power = self.power_memory if memory else self.power
        scale = 1.0 if power is None else power.value * self._q(power)
        return self._q(fit) * scale

    def _q(self, fit: _Fit) -> float:
        return {"mid": 1.0, "low": fit.low, "high": fit.high}[self.quantile]

    # ---- pricing ------------------------------------------------------------------------
    def gemm_seconds(self, m: np.ndarray, n: np.ndarray, k: np.ndarray, dtype: str) -> np.ndarray:
        """One GEMM of output m x n reducing over k."""
        fit = self.gemm[dtype]
        m, n, k = (np.asarray(a, float) for a in (m, n, k))
        compute = 2 * m * n * k / (self.peak[dtype] * fit.value * _occupancy(m, n, self.sms))
        memory = _gemm_bytes(m, n, k, dtype) / self.hbm_bytes_per_s
        return np.maximum(compute, memory) * self._mult(fit) + self.launch_s

    def _linear(self, m: np.ndarray, k: np.ndarray, n: np.ndarray, dtype: str, bwd: np.ndarray
                ) -> np.ndarray:
        """x[m, k] @ w[k, n] forward, or its backward: the input gradient (m x k over n)
        and the weight gradient (k x n over m)."""
        fwd = self.gemm_seconds(m, n, k, dtype)
        back = self.gemm_seconds(m, k, n, dtype) + self.gemm_seconds(k, n, m, dtype)
        return np.where(bwd, back, fwd)

    def _memory_bound(self, nbytes: np.ndarray, kernels: np.ndarray, op_class: str) -> np.ndarray:
        fit = self.bandwidth[op_class]
        return (np.asarray(nbytes, float) / (self.hbm_bytes_per_s * fit.value)
                * self._mult(fit, memory=True) + np.asarray(kernels, float) * self.launch_s)

    def attention_tflops(self, kernel: str, p: str, head_dim: int, seqlen: np.ndarray) -> np.ndarray:
        """Published throughput (causal, FlashAttention's FLOP count) at each length: linear
        in log2 length between the figures, held at the ends."""
        x, y = _curve(self, kernel, p, head_dim)
        return np.interp(np.log2(np.maximum(seqlen, 1)), x, y) * 1e12

    def seconds(self, rows: pd.DataFrame, family: str, *, compiled: bool = False,
                impl: str = "sdpa", fused_norm: bool = False, fused_loss: bool = False
                ) -> np.ndarray:
        """One run of each row's op (profile-style case rows, as ``autotune.step_ops``
        writes them) on this GPU: ``compiled`` blocks fuse their elementwise chains,
        ``fused_norm`` and ``fused_loss`` are the project's fused RMSNorm and chunked
        linear cross-entropy kernels."""
        if family == "copy":  # buffer copies: ``bytes`` read and written
            return self._memory_bound(rows["bytes"].to_numpy(float), np.ones(len(rows)), "elementwise")
        dtype = rows["dtype"].to_numpy()
        bwd = (rows["pass"] == "bwd").to_numpy()
        if family == "gemm":
            out = np.zeros(len(rows))
            for dt in set(dtype):
                sel = dtype == dt
                out[sel] = self._linear(rows.m.to_numpy(float)[sel], rows.k.to_numpy(float)[sel],
                                        rows.n.to_numpy(float)[sel], dt, bwd[sel])
            return out
        if family == "attention":
            return self._attention(rows, impl)
        if family == "norm":
            fused = compiled | ((rows.op == "rms_norm").to_numpy() & fused_norm)
            nbytes = np.where(fused, rows["bytes"], rows["eager_bytes"])
            kernels = np.where(fused, 1, rows["eager_kernels"])
            op_class = np.where(rows.op == "rms_norm", "rms_norm", "elementwise")
            out = np.zeros(len(rows))
            for c in ("rms_norm", "elementwise"):
                sel = op_class == c
                out[sel] = self._memory_bound(nbytes[sel], kernels[sel], c)
            return out
        if family == "loss":
            t, h, v = (rows[c].to_numpy(float) for c in ("tokens", "hidden", "vocab"))
            out = np.zeros(len(rows))
            for dt in set(dtype):
                sel = dtype == dt
                out[sel] = self._linear(t[sel], h[sel], v[sel], dt, bwd[sel])
            # the softmax over the logits: what the trainer's code moves per logit
            if fused_loss:  # each chunk's float32 logits written once and read once
                per_logit, kernels = np.full(len(rows), 8.0), np.full(len(rows), 2.0)
            else:
                per_logit = rows["eager_bytes_per_logit"].to_numpy(float)
                kernels = rows["eager_kernels"].to_numpy(float)
            return out + self._memory_bound(t * v * per_logit, kernels, "cross_entropy")
        if family == "optimizer":
            return self._memory_bound(rows["bytes"].to_numpy(float), np.ones(len(rows)), "adamw")
        raise ValueError(f"the GPU prior has no family {family!r}")

    def _attention(self, rows: pd.DataFrame, impl: str) -> np.ndarray:
        kernel = _ATTENTION_KERNEL.get(impl, "fa2")
        if kernel not in set(self.attention.kernel):
            kernel = "fa2"
        out = np.zeros(len(rows))
        fit = self.attention_fit
        passes = rows["pass"].to_numpy()
        for i, r in enumerate(rows.itertuples(index=False)):
            seqlens = np.asarray(r.seqlens, float)
            prefix = float(r.prefix) if "prefix" in rows and not pd.isna(r.prefix) else 0.0
            # causal pairs per sequence (a prefix adds a full block of keys to the first)
            pairs = seqlens * (seqlens + 1) / 2
            if prefix:
                pairs[0] += prefix * seqlens[0]
            scale = 2.5 if passes[i] == "bwd" else 1.0
            flops = 4.0 * pairs * r.heads * r.head_dim * scale
            if kernel == "eager":
                # scores materialized: two GEMMs and a softmax over them per head
                rate = self.peak[r.dtype] * self.gemm[r.dtype].value
            else:
                rate = self.attention_tflops(kernel, passes[i], r.head_dim,
                                             seqlens + prefix * (np.arange(len(seqlens)) == 0))
            out[i] = float((flops / rate).sum()) * self._mult(fit) + self.launch_s
        return out

    def sources(self) -> dict[str, str]:
        out = {f"gpu_prior.gemm.{dt}": f"efficiency {f.value:.3f} of {self.peak[dt] / 1e12:.0f} "
               f"TFLOP/s, {f.source}" for dt, f in self.gemm.items()}
        out |= {f"gpu_prior.{c}": f"{f.value:.3f} of {self.hbm_bytes_per_s / 1e9:.0f} GB/s, {f.source}"
                for c, f in self.bandwidth.items()}
        kernels = sorted(set(self.attention.kernel))
        out["gpu_prior.attention"] = (f"{', '.join(kernels)} throughput tables "
                                      f"({self.attention_fit.source})")
        out["gpu_prior.launch"] = f"{self.launch_s * 1e6:.1f} us per kernel, {self.launch_source}"
        if self.power is not None:
            out["gpu_prior.power_limit"] = (f"compute-bound kernels x{self.power.value:.2f}, "
                                            f"memory-bound x{self.power_memory.value:.2f} in "
                                            f"time: {self.power.source}")
        return out


def _curve(prior: OpPrior, kernel: str, p: str, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(log2 lengths, TFLOP/s) of one kernel, pass and the nearest cited head dim."""
    key = (kernel, p, head_dim)
    if key not in prior.curves:
        prior.curves[key] = _read_curve(prior, kernel, p, head_dim)
    return prior.curves[key]


def _read_curve(prior: OpPrior, kernel: str, p: str, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    t = prior.attention
    rows = t[(t.kernel == kernel) & (t["pass"] == p)]
    if rows.empty:
        raise KeyError(f"no {kernel} {p} attention figures for {prior.device}")
    dims = rows.head_dim.unique()
    d = dims[np.argmin(np.abs(np.log2(dims) - math.log2(head_dim)))]
    rows = rows[rows.head_dim == d].groupby("seqlen").tflops.median()
    return np.log2(rows.index.to_numpy(float)), rows.to_numpy(float)


def _occupancy(m: np.ndarray, n: np.ndarray, sms: int) -> np.ndarray:
    """The busy share of the SMs over a GEMM's waves of 128 x 128 output tiles."""
    tiles = np.ceil(m / TILE) * np.ceil(n / TILE)
    return tiles / (np.ceil(tiles / sms) * sms)


def _gemm_bytes(m: np.ndarray, n: np.ndarray, k: np.ndarray, dtype: str) -> np.ndarray:
    """Operands read and the result written once."""
    return (m * k + k * n + m * n) * (2 if dtype == "bf16" else 4)


def _sources(frame: pd.DataFrame) -> str:
    return ", ".join(sorted(set(frame.source.astype(str)))) if "source" in frame else ""


def _fit_gemm(device: str, dtype: str, sms: int, peak: float, hbm: float) -> _Fit:
    t = _table("gemm.csv")
    group = _compute_group(device)
    pts = t[t.device.isin(group) & (t.dtype == dtype)] if len(t) else t
    if pts.empty:
        raise KeyError(f"no cited {dtype} GEMM figures for {device}")
    m, n, k = (pts[c].to_numpy(float) for c in ("m", "n", "k"))
    measured = 2 * m * n * k / (pts.tflops.to_numpy(float) * 1e12)
    occ = _occupancy(m, n, sms)
    mem = _gemm_bytes(m, n, k, dtype) / hbm
    # Training operands are random-like, and a GPU at its power limit runs random data
    # slower than predictable data (thonking_matmul_power): the efficiency's level comes
    # from random-data figures where the device has any; every figure shapes the spread.
    level = (pts["data"] == "random").to_numpy().copy() if "data" in pts else np.zeros(len(pts), bool)
    if not level.any():
        level[:] = True
    # each compute-bound figure's efficiency: its rate over the peak its waves can reach
    each = 2 * m * n * k / measured / (peak * occ)
    bound = level & (2 * m * n * k / (peak * each * occ) >= mem)
    e = float(np.median(each[bound if bound.any() else level]))
    ratio = measured / np.maximum(2 * m * n * k / (peak * e * occ), mem)
    lo, hi = _spread(ratio) if len(pts) >= 3 else _pooled_gemm_spread(dtype)
    others = sorted(set(pts.device) - {device})
    borrowed = f"with {', '.join(others)} (same die and clocks); " if others else ""
    few = "" if len(pts) >= 3 else "spread of the device with the most figures; "
    return _Fit(e, lo, hi, len(pts), f"{borrowed}{few}{len(pts)} cited GEMMs: {_sources(pts)}")


def _pooled_gemm_spread(dtype: str) -> tuple[float, float]:
    """The spread of the compute group with the most figures, for a device with too few
    figures of its own to have one."""
    from profilers.ceilings import datasheet

    t = _table("gemm.csv")
    t = t[t.dtype == dtype]
    groups = t.device.map(lambda d: _SAME_COMPUTE.get(d, d))
    if t.empty:
        return 1.0, 1.0
    root = groups.value_counts().index[0]
    if (groups == root).sum() < 3:
        return 1.0, 1.0
    row = datasheet(root)
    sms = int(_table("devices.csv").set_index("device").loc[root, "sms"])
    fit = _fit_gemm(root, dtype, sms, row.peak_flops(dtype), row.memory_bandwidth_gbs * 1e9)
    return fit.low, fit.high


def _fit_bandwidth(device: str, op_class: str, hbm_by_device: dict[str, float]) -> _Fit:
    t = _table("bandwidth.csv")
    # what stands in where a class has no figure of its own: another memory-bound kernel
    # that streams its operands once
    classes = {"rms_norm": ("rms_norm", "layer_norm", "softmax"),
               "elementwise": ("elementwise", "copy", "rms_norm", "softmax"),
               "cross_entropy": ("cross_entropy", "softmax"),
               "adamw": ("adamw", "elementwise", "copy", "rms_norm", "softmax")}
    for wanted in classes[op_class]:
        own = t[(t.device == device) & (t.op_class == wanted)] if len(t) else t
        if len(own):
            f = own.achieved_gbs.to_numpy(float) * 1e9 / hbm_by_device[device]
            lo, hi = _spread(np.median(f) / f)
            stand_in = "" if wanted == op_class else f"no cited {op_class} figure: "
            return _Fit(float(np.median(f)), lo, hi, len(own),
                        f"{stand_in}{device} {wanted}: {_sources(own)}")
    for wanted in classes[op_class]:
        other = t[t.op_class == wanted] if len(t) else t
        other = other[other.device.isin(hbm_by_device)]
        if len(other):
            f = np.array([g * 1e9 / hbm_by_device[d] for g, d in zip(other.achieved_gbs, other.device)])
            lo, hi = _spread(np.median(f) / f)
            return _Fit(float(np.median(f)), lo, hi, len(other),
                        f"no {device} figure; median fraction of {wanted} on "
                        f"{', '.join(sorted(set(other.device)))}: {_sources(other)}")
    raise KeyError(f"no cited bandwidth figures for {op_class}")


def _attention_table(device: str, peak: float) -> tuple[pd.DataFrame, str]:
    """Causal bf16 throughput per kernel, pass (fwd, bwd), head dim and length. Where a
    source gives forward and forward+backward, the backward is what the difference leaves
    (FlashAttention counts backward as 2.5 forwards); where it gives only forward+backward,
    that rate stands for both passes. A device without figures of its own takes the
    fraction of peak of the device with the most figures, labelled as such."""
    t = _table("attention.csv")
    if not len(t):
        raise KeyError("no attention figures")
    t = t[(t.causal == 1) & (t.dtype.isin(["bf16", "fp16"]))]
    group = _compute_group(device)
    own = t[t.device.isin(group)]
    how = ""
    if own.empty:
        from profilers.ceilings import datasheet

        best = t.device.value_counts().index[0]
        own = t[t.device == best].copy()
        own["tflops"] = own.tflops * peak / datasheet(best).peak_flops("bf16")
        how = f"no cited {device} attention figures: {best}'s fraction of peak; "
    rows = []
    for (kernel, d), g in own.groupby(["kernel", "head_dim"]):
        by = {p: g[g["pass"] == p].groupby("seqlen").tflops.median() for p in ("fwd", "bwd", "fwd_bwd")}
        lengths = sorted(set().union(*(b.index for b in by.values())))
        for n in lengths:
            f, b, fb = (by[p].get(n) for p in ("fwd", "bwd", "fwd_bwd"))
            if b is None and f is not None and fb is not None and 3.5 / fb > 1 / f:
                b = 2.5 / (3.5 / fb - 1 / f)
            if f is None and fb is not None:
                f = fb
            if b is None and fb is not None:
                b = fb
            for p, v in (("fwd", f), ("bwd", b)):
                if v is not None:
                    rows.append({"kernel": kernel, "pass": p, "head_dim": d, "seqlen": n, "tflops": v,
                                 "source": ", ".join(sorted(set(g.source)))})
    out = pd.DataFrame(rows)
    return out, f"{how}{len(own)} cited points: {_sources(own)}"


@cache
def _build(name: str) -> OpPrior:
    from profilers.ceilings import datasheet, datasheet_names

    row = datasheet(name)
    devices = _table("devices.csv").set_index("device")
    hbm_by_device = {n: datasheet(n).memory_bandwidth_gbs * 1e9 for n in datasheet_names()}
    sms = int(devices.loc[name, "sms"])
    peak = {"bf16": row.peak_flops("bf16"), "fp32": row.peak_flops("fp32")}
    hbm = row.memory_bandwidth_gbs * 1e9
    gemm = {"bf16": _fit_gemm(name, "bf16", sms, peak["bf16"], hbm)}
    try:
        gemm["fp32"] = _fit_gemm(name, "fp32", sms, peak["fp32"], hbm)
    except KeyError:  # TF32 / FP32 matrix runs on the same matrix units at a lower rate
        b = gemm["bf16"]
        gemm["fp32"] = replace(b, source=f"no cited fp32 GEMM figures: the bf16 efficiency at "
                                         f"the fp32 matrix peak ({b.source})")
    bw = {c: _fit_bandwidth(name, c, hbm_by_device)
          for c in ("rms_norm", "elementwise", "cross_entropy", "adamw")}
    att, how = _attention_table(name, peak["bf16"])
    over = _table("overhead.csv")
    floor = over[over.what == "launch_floor"] if len(over) else over
    own = floor[floor.device == name] if len(floor) else floor
    use = own if len(own) else floor
    scale = use.unit.map({"us": 1e-6, "ns": 1e-9, "ms": 1e-3}).to_numpy(float)
    launch = float(np.median(use.value.to_numpy(float) * scale))
    others = ", ".join(sorted(set(floor.device)))
    launch_src = (f"{name}: {_sources(own)}" if len(own)
                  else f"no {name} figure; median of {others}: {_sources(floor)}")
    power = _power_limit(devices.loc[name])
    return OpPrior(row.name, peak, hbm, sms, gemm, bw, launch, launch_src, att.reset_index(drop=True),
                   _attention_spread(len(att), how), *(power or (None, None)))


def _power_limit(dev: pd.Series) -> tuple[_Fit, _Fit] | None:
    """Time multipliers (compute-bound, memory-bound) of a device run below its TDP:
    throughput = (limit / TDP) ** a, the exponent fitted per kind on the cited capped
    throughputs (power_cap.csv); the spread runs from no slowdown to the slowest cited."""
    if pd.isna(dev.get("power_limit_w")) or pd.isna(dev.get("tdp_w")):
        return None
    ratio = float(dev.power_limit_w) / float(dev.tdp_w)
    t = _table("power_cap.csv").dropna(subset=["throughput_fraction"])
    out = []
    for memory in (False, True):
        rows = t[t.workload.str.contains("memory-bound") == memory]
        rows = rows[~rows.workload.str.contains("FP8")]
        if rows.empty:
            raise KeyError("no cited throughput under a power limit")
        a = np.log(rows.throughput_fraction.to_numpy(float)) / np.log(
            rows.power_cap_w.to_numpy(float) / rows.tdp_w.to_numpy(float))
        mid = ratio ** -float(np.median(a))
        out.append(_Fit(mid, 1.0 / mid, ratio ** -float(a.max()) / mid, len(rows),
                        f"{dev.power_limit_w:.0f} W of {dev.tdp_w:.0f} W TDP, throughput = "
                        f"(limit / TDP) ** {np.median(a):.2f} fitted on {len(rows)} cited "
                        f"capped figures ({_sources(rows)}; low confidence: no method given)"))
    return out[0], out[1]


def _attention_spread(points: int, how: str) -> _Fit:
    """The attention figures' own spread: where several sources give one setting, how far
    apart they are (ratios to the setting's median)."""
    t = _table("attention.csv")
    t = t[(t.causal == 1)]
    med = t.groupby(["device", "kernel", "pass", "head_dim", "seqlen"]).tflops.transform("median")
    lo, hi = _spread((med / t.tflops).to_numpy(float))
    return _Fit(1.0, lo, hi, points, how)


# ---- collectives --------------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    """A process group as the mesh lays it out: ``ranks`` members, ``per_node`` of them on
    each node they span."""

    ranks: int
    per_node: int

    @property
    def nodes(self) -> int:
        return max(1, self.ranks // max(self.per_node, 1))


@dataclass(frozen=True)
class CollectivePrior:
    """Bus bandwidth and latency of one system's collectives, fitted on cited nccl-tests
    figures: per collective, the intra-node plateau and per-step latency; across nodes,
    the fraction of NIC line rate the cited multi-node runs reach."""

    device: str
    intra: dict  # collective -> (busbw bytes/s, latency per ring step s, source)
    nic_bytes_per_s: float  # per GPU
    inter_efficiency: float
    inter_latency_s: float  # per step across nodes
    source: str
    quantile: str = "mid"
    spread: tuple = (1.0, 1.0)

    @classmethod
    def for_device(cls, name: str) -> CollectivePrior:
        return _collective_prior(name)

    def at(self, quantile: str) -> CollectivePrior:
        return replace(self, quantile=quantile)

    def seconds(self, collective: str, nbytes: float | np.ndarray, group: Group) -> np.ndarray:
        """One call moving a buffer of ``nbytes`` (the whole buffer: the all-reduced tensor,
        the gathered output, the scattered input) over ``group``."""
        n = group.ranks
        nbytes = np.asarray(nbytes, float)
        if n <= 1:
            return np.zeros_like(nbytes)
        key = collective if collective in self.intra else "all_gather"
        busbw, hop, _ = self.intra[key]
        steps = 2 * (n - 1) if collective == "all_reduce" else (n - 1)
        if group.nodes > 1:
            if math.isnan(self.nic_bytes_per_s * self.inter_efficiency):
                raise KeyError(f"no cited figures for collectives across nodes of {self.device}")
            busbw = min(busbw, group.per_node * self.nic_bytes_per_s * self.inter_efficiency)
            ring = steps * self.inter_latency_s
            # a tree crosses nodes log2(nodes) times each way (NCCL's all-reduce)
            tree = 2 * math.log2(group.nodes) * self.inter_latency_s + 2 * hop * group.per_node
            latency = min(ring, tree) if collective == "all_reduce" else ring
        else:
            latency = steps * hop
        mult = {"mid": 1.0, "low": self.spread[0], "high": self.spread[1]}[self.quantile]
        name = collective if collective in ("all_reduce", "all_gather", "reduce_scatter") else "send_recv"
        return latency + nbytes * bus_factor(name, n) / busbw * mult


def _plateau(rows: pd.DataFrame) -> pd.DataFrame:
    """The large-message rows (a figure without a size is a plateau figure)."""
    big = rows[rows.size_bytes.isna() | (rows.size_bytes >= 2**28)]
    return big if len(big) else rows[rows.size_bytes == rows.size_bytes.max()]


@cache
def _collective_prior(name: str) -> CollectivePrior:
    topo = _table("topology.csv")
    coll = _table("collectives.csv")
    group = _compute_group(name)
    t = topo[topo.device.isin(group)]
    if t.empty:
        raise KeyError(f"no cited topology for {name}")
    t = t.set_index("device").loc[[d for d in group if d in set(t.device)]].iloc[0]
    inter_rows = coll.fabric.astype(str).str.match(r"(ib|roce)")
    node = coll[~inter_rows & (coll.nodes == 1)]
    mine = node[node.device.isin(group)]
    link = float(t.intra_link_gbs_per_direction) * 1e9
    notes = []
    if mine.empty:  # the busbw / link ratio of the systems that have figures
        ratios = [float(_plateau(g).busbw_gbs.max()) * 1e9
                  / (float(topo.set_index("device").loc[d, "intra_link_gbs_per_direction"]) * 1e9)
                  for d, g in node[node.collective == "all_reduce"].groupby("device")
                  if d in set(topo.device)]
        if not ratios:
            raise KeyError(f"no cited intra-node collective figures for {name}")
        r = float(np.median(ratios))
        intra = {c: (r * link, 1e-6, "link") for c in ("all_reduce", "all_gather", "reduce_scatter")}
        notes.append(f"no cited collective figures for {name}: its link ({link / 1e9:.0f} GB/s) at "
                     f"the busbw/link ratio {r:.2f} of {', '.join(sorted(set(node.device)))}")
    else:
        intra = {}
        for c in ("all_reduce", "all_gather", "reduce_scatter"):
            pts = mine[mine.collective == c]
            if pts.empty:
                continue
            n = int(pts.gpus_per_node.max())
            busbw = float(_plateau(pts[pts.gpus_per_node == n]).busbw_gbs.max()) * 1e9
            small = pts[(pts.size_bytes <= 2**16) & pts.latency_us.notna()]
            steps = 2 * (n - 1) if c == "all_reduce" else n - 1
            hop = float(small.latency_us.min()) * 1e-6 / steps if len(small) else float("nan")
            intra[c] = (busbw, hop, _sources(pts))
        for c, other in (("all_gather", "reduce_scatter"), ("reduce_scatter", "all_gather")):
            if c not in intra and other in intra:  # the two halves of a ring move as fast
                intra[c] = intra[other]
        if "all_gather" not in intra:
            # a ring all-reduce is a reduce-scatter then an all-gather: same bus bandwidth
            ring = mine[(mine.collective == "all_reduce") & (mine.algo != "nvls")]
            bw = float(_plateau(ring).busbw_gbs.max()) * 1e9 if len(ring) else intra["all_reduce"][0]
            for c in ("all_gather", "reduce_scatter"):
                intra[c] = (bw, intra["all_reduce"][1], _sources(ring))
            notes.append("all-gather and reduce-scatter at the ring all-reduce's bus bandwidth")
    hops = [v[1] for v in intra.values() if not math.isnan(v[1])]
    hop = min(hops) if hops else 1e-6
    if not hops:
        notes.append("no cited small-message figure inside a node: 1 us per ring step assumed")
    intra = {c: (v[0], hop if math.isnan(v[1]) else v[1], v[2]) for c, v in intra.items()}
    multi = coll[inter_rows]
    nic = float(t.nic_gbps_per_gpu) / 8 * 1e9 if not pd.isna(t.nic_gbps_per_gpu) else float("nan")
    # in-network reduction (SHARP) needs switches a cluster may not have: not the default
    plain = ~multi.note.astype(str).str.contains("SHARP") & ~multi.algo.isin(["nvls", "collnet"])
    own_multi = multi[multi.device.isin(group) & (multi.gpus_per_node > 1) & plain]
    if len(own_multi) and not math.isnan(nic):
        big = _plateau(own_multi)
        eff = float(np.median(big.busbw_gbs.to_numpy(float) * 1e9
                              / (big.gpus_per_node.to_numpy(float) * nic)))
        src_inter = _sources(own_multi)
    else:
        eff, src_inter = float("nan"), f"no cited multi-node figure for {name}"
    lat = multi[(multi.size_bytes <= 2**16) & multi.latency_us.notna()]
    if len(lat):
        ranks = lat.nodes * lat.gpus_per_node
        inter_lat = float((lat.latency_us / (2 * (ranks - 1))).min()) * 1e-6
        src_inter += f"; latency {_sources(lat)}"
    else:
        inter_lat = 10e-6
        src_inter += "; no cited small-message figure across nodes: 10 us per step assumed"
    spreads = [float(_plateau(g).busbw_gbs.max() / _plateau(g).busbw_gbs.min())
               for _, g in mine.groupby(["collective", "algo"])] if len(mine) else []
    hi = max(spreads) if spreads else 1.0
    src = "; ".join([f"{t.intra_fabric}: {'; '.join(sorted({v[2] for v in intra.values() if v[2]}))}",
                     f"across nodes {t.inter_fabric}: {src_inter}", *notes])
    return CollectivePrior(name, intra, nic, min(eff, 1.0) if not math.isnan(eff) else eff,
                           inter_lat, src, spread=(1.0, hi))
