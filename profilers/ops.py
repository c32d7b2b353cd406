"""Op-family microbenchmarks: one case (a family, an op, a pass and its shapes) in, one timed
row out.

A case is a plain dict, e.g. ``{"family": "gemm", "op": "linear", "pass": "fwd", "dtype":
"fp32", "m": 512, "k": 256, "n": 768}``; ``case_key`` hashes it, so a store knows what it
already holds. Forward and backward are timed separately: backward re-runs
``torch.autograd.grad`` over a retained graph, so no forward is inside its window.

Timing (Triton's do_bench, Kernel Tuner): calls until a warm-up window has passed are
discarded; the per-call estimate sets how many calls one sample covers (so a sample is long
enough to beat timer noise) and how many samples fill the timed window; each sample's time
is divided by its calls, the median is reported and every sample kept. CUDA samples are
event pairs read after one synchronize (``profilers.timer.StepTimer``).

On a CPU, a canary matmul timed before every window lets a sweep scale windows taken at
different times to the machine's reference speed (``pool_windows``). A GPU has no canary: a
256^3 matmul there times kernel-launch latency, not the speed the profiled ops depend on,
and its windows are pooled as measured.

Run as a module, it is the child process of a sweep (``profilers.sweep``): ``{case, window}``
jobs in as JSON lines, ``START key/window`` and ``ROW {json}`` lines out, so that its parent
can time each window out and attribute a crash to the case that caused it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from profilers.families import analytic_cost

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["case_key", "measure_window", "pool_windows", "run_case", "window_row"]

_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def case_key(case: dict[str, Any]) -> str:
    canonical = json.dumps(case, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


# ---- building a case ----------------------------------------------------------------------

def _build(case: dict[str, Any], device: Any) -> tuple[Callable[[], Any], Callable[[], Any] | None]:
    """(forward, backward) callables for a case; backward is None for a step-only op."""
    import torch
    import torch.nn.functional as F

    from kernels.attention import prefix_causal_attention, varlen_attention
    from kernels.elementwise import apply_rope, rms_norm, swiglu

    dtype = getattr(torch, _DTYPES[case["dtype"]])
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int, grad: bool = True, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_(grad)

    fam, op = case["family"], case["op"]
    if fam == "optimizer":
        tensors = case["tensors"]
        per = max(1, case["numel"] // tensors)
        params = [torch.nn.Parameter(rand(per, grad=False)) for _ in range(tensors)]
        for p in params:
            p.grad = rand(per, grad=False, scale=1e-3)
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=case.get("foreach", True))
        return opt.step, None

    if fam == "gemm":
        x, w = rand(case["m"], case["k"]), rand(case["n"], case["k"], scale=case["k"] ** -0.5)
        inputs: tuple[torch.Tensor, ...] = (x, w)
        fwd = lambda: F.linear(x, w)  # noqa: E731
    elif fam == "attention":
        h, hkv, d = case["heads"], case["kv_heads"], case["head_dim"]
        seqlens = case["seqlens"]
        t = sum(seqlens)
        q, k, v = rand(t, h, d), rand(t, hkv, d), rand(t, hkv, d)
        impl = case.get("impl", "sdpa")
        if op == "prefix":
            kp, vp = rand(case["prefix"], hkv, d), rand(case["prefix"], hkv, d)
            inputs = (q, k, v, kp, vp)
            fwd = lambda: prefix_causal_attention(q, kp, vp, k, v, impl=impl)  # noqa: E731
        else:
            cu = [0]
            for n in seqlens:
                cu.append(cu[-1] + n)
            inputs = (q, k, v)
            fwd = lambda: varlen_attention(q, k, v, cu, cu, impl=impl)  # noqa: E731
    elif fam == "norm":
        t, width = case["tokens"], case["width"]
        if op == "rms_norm":
            x, weight = rand(t, width), rand(width)
            inputs = (x, weight)
            fwd = lambda: rms_norm(x, weight, 1e-5)  # noqa: E731
        elif op == "rope":
            d = case["head_dim"]
            x = rand(t, width // d, d)
            ang = torch.rand(t, 1, d // 2, generator=gen, device=device)
            cos, sin = ang.cos(), ang.sin()
            inputs = (x,)
            fwd = lambda: apply_rope(x, cos, sin)  # noqa: E731
        elif op == "swiglu":
            a, b = rand(t, width), rand(t, width)
            inputs = (a, b)
            fwd = lambda: swiglu(a, b)  # noqa: E731
        elif op == "add":
            a, b = rand(t, width), rand(t, width)
            inputs = (a, b)
            fwd = lambda: a + b  # noqa: E731
        else:
            raise ValueError(f"unknown norm op {op!r}")
    elif fam == "loss":
        t, hid, vocab = case["tokens"], case["hidden"], case["vocab"]
        x, w = rand(t, hid), rand(vocab, hid, scale=hid ** -0.5)
        labels = torch.randint(0, vocab, (t,), generator=gen, device=device)
        inputs = (x, w)
        fwd = lambda: F.cross_entropy(F.linear(x, w).float(), labels, reduction="sum")  # noqa: E731
    else:
        raise ValueError(f"unknown family {fam!r}")

    out = fwd()
    grad_out = torch.ones_like(out) if out.dim() == 0 else \
        torch.randn(out.shape, generator=gen, device=device).to(out.dtype)

    def bwd() -> Any:
        return torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    return fwd, bwd


# ---- timing -------------------------------------------------------------------------------

def bench(fn: Callable[[], Any], device_kind: str, *, min_time_s: float = 0.1,
          warmup_s: float = 0.025, min_samples: int = 5, max_samples: int = 200,
          target_sample_s: float = 2e-3) -> tuple[list[float], int]:
    """Per-call times of ``fn`` (one per sample) and the calls each sample covered."""
    import torch

    from profilers.timer import StepTimer

    sync = torch.cuda.synchronize if device_kind == "cuda" else (lambda: None)
    fn()  # first call: lazy initialisation, allocator growth; never timed
    sync()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < warmup_s:
        fn()
        sync()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    inner = max(1, min(1000, math.ceil(target_sample_s / per_call)))
    samples = max(min_samples, min(max_samples, math.ceil(min_time_s / (inner * per_call))))
    timer = StepTimer(device_kind)
    for _ in range(samples):
        with timer.step():
            for _ in range(inner):
                fn()
    return [s / inner for s in timer.samples], inner


class _ForeignCPU:
    """The share of the machine's CPU time that other processes used during a window.

    On a small host another busy process does not just take its share: a BLAS whose
    OpenMP threads wait for each other can run 10-100x slower. A figure measured so is not
    this machine's, so it is flagged and re-measured."""

    def __enter__(self) -> _ForeignCPU:
        import psutil

        self._proc = psutil.Process()
        self._t0, self._sys0, self._own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        other = (self._busy() - self._sys0) - (self._own() - self._own0)
        import psutil

        self.fraction = max(0.0, other) / max(wall * (psutil.cpu_count() or 1), 1e-9)

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + \
            getattr(t, "softirq", 0.0)

    def _own(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system


def measure_window(case: dict[str, Any], device_kind: str = "cpu", *,
                   max_foreign_cpu: float = 0.2, attempts: int = 3,
                   **bench_kw: Any) -> dict[str, Any]:
    """One timed window of a case: ``{"status", "samples_s", "inner", "foreign_cpu",
    "attempts"}`` or a failed status with its ``error``. A window in which other processes
    used more than ``max_foreign_cpu`` of the CPU is measured again (up to ``attempts`` in
    all) and the least disturbed kept."""
    best: dict[str, Any] | None = None
    for attempt in range(1, attempts + 1):
        window = _window_once(case, device_kind, **bench_kw) | {"attempts": attempt}
        if window["status"] != "COMPLETE":
            return window
        if best is None or window["foreign_cpu"] < best["foreign_cpu"]:
            best = window
        if window["foreign_cpu"] <= max_foreign_cpu:
            break
        time.sleep(1.0)
    assert best is not None
    return best


def _window_once(case: dict[str, Any], device_kind: str, **bench_kw: Any) -> dict[str, Any]:
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if device_kind == "cuda" else \
        torch.device("cpu")
    try:
        fwd, bwd = _build(case, device)
        fn = bwd if case["pass"] == "bwd" else fwd
        if fn is None:
            raise ValueError(f"{case['family']}/{case['op']} has no {case['pass']} pass")
        canary = {"canary_s": canary_time(device_kind)} if device_kind == "cpu" else {}
        with _ForeignCPU() as foreign:
            samples, inner = bench(fn, device_kind, **bench_kw)
    except (MemoryError, torch.OutOfMemoryError) as exc:
        return {"status": "OOM", "error": str(exc).splitlines()[0][:300]}
    except Exception as exc:  # any failure of one case is that case's result
        status = "OOM" if "out of memory" in str(exc) or "can't allocate" in str(exc) else "CRASHED"
        return {"status": status, "error": str(exc).splitlines()[0][:300]}
    return {"status": "COMPLETE", "samples_s": samples, "inner": inner,
            "foreign_cpu": foreign.fraction, **canary}


_CANARY_N = 256
_canary_operands: dict[str, Any] = {}


def canary_time(device_kind: str, *, min_time_s: float = 0.01) -> float:
    """Median time of a fixed 256^3 float32 matmul, taken just before each window.

    A shared host's speed drifts by 10-20% over seconds and minutes (neighbours, clocks),
    which no window length averages away between two sweeps an hour apart. The canary
    tracks that drift: a window's samples times (reference canary / this canary) is what
    the case would have taken at the machine's reference speed (``pool_windows``).

    CPU only: on a GPU this matmul times launch latency, not what the profiled ops or the
    trainer's steps depend on, so nothing on a GPU is scaled by a canary."""
    import numpy as np
    import torch

    _cpu_only(device_kind)
    if device_kind not in _canary_operands:
        device = torch.device("cpu")
        gen = torch.Generator(device=device).manual_seed(1)
        a, b = (torch.randn(_CANARY_N, _CANARY_N, generator=gen, device=device) for _ in range(2))
        _canary_operands[device_kind] = (a, b, torch.empty_like(a))
    a, b, out = _canary_operands[device_kind]
    samples, _ = bench(lambda: torch.mm(a, b, out=out), device_kind, min_time_s=min_time_s,
                       warmup_s=0.005, min_samples=3)
    return float(np.median(samples))


def canary_reference(device_kind: str, fingerprint_key: str, cache_dir: Path | None = None) -> float:
    """The canary's time for this machine, measured once (a longer window) and cached beside
    the matmul ceilings, so that every sweep on the machine scales to the same reference.
    Kept per torch thread count (``threads_tag``): ranks sharing a host run fewer threads, and
    their canary runs slower for that, not because the machine drifted. CPU only."""
    import torch

    from profilers.ceilings import _default_cache_dir
    from profilers.fingerprint import threads_tag
    from profilers.store import atomic_write_text

    _cpu_only(device_kind)
    key = fingerprint_key + threads_tag(torch.get_num_threads())
    path = (cache_dir or _default_cache_dir()) / "canary.json"
    try:
        known = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        known = {}
    if key not in known:
        known[key] = canary_time(device_kind, min_time_s=1.0)
        atomic_write_text(path, json.dumps(known, indent=2) + "\n")
    return float(known[key])


def _cpu_only(device_kind: str) -> None:
    if device_kind != "cpu":
        raise ValueError(f"device_kind={device_kind!r}: the canary is timed on CPUs only")


def window_row(case: dict[str, Any], window: int, result: dict[str, Any],
               canary_ref_s: float | None = None) -> dict[str, Any]:
    """The stored record of one window of a case: the case, its analytic cost, which window,
    the statistics and every sample (or the failure)."""
    import numpy as np

    key = case_key(case)
    # No canary fields where no canary was timed (a GPU window, a failure seen by the sweep).
    ref = {"canary_ref_s": canary_ref_s} if canary_ref_s is not None else {}
    row: dict[str, Any] = {"key": f"{key}/{window}", "case": key, "window": window, **case, **ref}
    row["flops"], row["bytes"] = analytic_cost(case)
    if result["status"] != "COMPLETE":
        return row | {"status": result["status"], "error": result["error"], "samples_s": []}
    samples = result["samples_s"]
    q25, q50, q75 = np.percentile(samples, [25, 50, 75])
    canary = {"canary_s": result["canary_s"]} if "canary_s" in result else {}
    return row | {"status": "COMPLETE", "error": "", "median_s": float(q50),
                  "iqr_s": float(q75 - q25), "min_s": float(min(samples)),
                  "n_samples": len(samples), "calls_per_sample": result["inner"],
                  "foreign_cpu": result["foreign_cpu"], "attempts": result["attempts"],
                  **canary, "samples_s": samples}


def pool_windows(windows: pd.DataFrame) -> pd.DataFrame:
    """One row per case from its window records: every sample pooled, their median and
    spread, each window's median (drift between windows stays visible), the worst
    foreign-CPU share. A case with a failed window carries that failure. Where every window
    has its canary (CPU profiles), also the median at the machine's reference speed and the
    canary ratio; a GPU case, without canary, has neither."""
    import numpy as np
    import pandas as pd

    if windows.empty:
        return windows
    rows = []
    shape_cols = [c for c in windows.columns if c not in _WINDOW_COLUMNS]
    for key, g in windows.groupby("case", sort=False):
        first = g.iloc[0]
        row = {c: first[c] for c in shape_cols} | {"key": key}
        failed = g[g.status != "COMPLETE"]
        if len(failed):
            rows.append(row | {"status": failed.status.iloc[0], "error": failed.error.iloc[0],
                               "windows": len(g)})
            continue
        samples = np.concatenate([np.asarray(s, dtype=float) for s in g.samples_s])
        q25, q50, q75 = np.percentile(samples, [25, 50, 75])
        rows.append(row | {"status": "COMPLETE", "error": "", "median_s": float(q50),
                           "iqr_s": float(q75 - q25), "min_s": float(samples.min()),
                           "n_samples": int(samples.size), "windows": len(g),
                           "window_medians_s": g.median_s.tolist(),
                           "foreign_cpu": float(g.foreign_cpu.max()),
                           **_at_reference(g), "samples_s": samples.tolist()})
    return pd.DataFrame(rows)


def _at_reference(g: pd.DataFrame) -> dict[str, float]:
    """A case's median with each window scaled by its canary to the reference speed, and the
    canary ratio; nothing where a window has no canary."""
    import numpy as np
    import pandas as pd

    if not {"canary_s", "canary_ref_s"} <= set(g.columns) or \
            pd.isna(g.canary_s).any() or pd.isna(g.canary_ref_s).any():
        return {}
    scaled = np.concatenate([np.asarray(s, dtype=float) * ref / c
                             for s, c, ref in zip(g.samples_s, g.canary_s, g.canary_ref_s)])
    return {"median_at_reference_s": float(np.median(scaled)),
            "canary_ratio": float(np.median(g.canary_s / g.canary_ref_s))}


_WINDOW_COLUMNS = {"key", "case", "window", "status", "error", "median_s", "iqr_s", "min_s",
                   "n_samples", "calls_per_sample", "foreign_cpu", "attempts", "canary_s",
                   "canary_ref_s", "samples_s"}


def run_case(case: dict[str, Any], device_kind: str = "cpu", *, windows: int = 1,
             **kw: Any) -> dict[str, Any]:
    """Time one case in ``windows`` back-to-back windows, pooled as a sweep pools them."""
    import pandas as pd

    rows = []
    ref = canary_time(device_kind) if device_kind == "cpu" else None
    for w in range(windows):
        rows.append(window_row(case, w, measure_window(case, device_kind, **kw), ref))
        if rows[-1]["status"] != "COMPLETE":
            break
    return pool_windows(pd.DataFrame(rows)).iloc[0].to_dict()


def _die_with_parent() -> None:
    """A sweep's child lives in its own session (so that its whole tree can be killed), which
    also shields it from the signals that end its parent; make the kernel end it too."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    """Measure windows ``(case, window)`` in the order given (a sweep passes them round by
    round, so one case's windows lie a whole round apart and a slow phase of the machine
    lands in one window of many cases rather than in every window of one)."""
    _die_with_parent()
    parent = os.getppid()
    p = argparse.ArgumentParser(prog="python -m profilers.ops")
    p.add_argument("--jobs", required=True, help="JSON lines of {case, window}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--min-time-s", type=float, default=0.05, help="timed time per window")
    p.add_argument("--attempts", type=int, default=3)
    p.add_argument("--canary-ref-s", type=float,
                   help="the machine's reference canary time (CPU; a GPU has no canary)")
    args = p.parse_args(argv)
    with open(args.jobs) as fh:
        jobs = [json.loads(line) for line in fh if line.strip()]
    # Reliability tests make one case die or hang: AUTOTUNE_PROFILE_FAULT=crash:KEY|hang:KEY.
    fault, _, fault_key = os.environ.get("AUTOTUNE_PROFILE_FAULT", "").partition(":")
    failed: set[str] = set()
    for job in jobs:
        case, window = job["case"], job["window"]
        key = case_key(case)
        if key in failed:  # its other windows would fail alike
            continue
        if os.getppid() != parent:  # the parent died before PR_SET_PDEATHSIG took hold
            return 1
        print(f"START {key}/{window}", flush=True)
        if key == fault_key and fault == "crash":
            os.abort()
        if key == fault_key and fault == "hang":
            time.sleep(3600)
        row = window_row(case, window, measure_window(case, args.device, attempts=args.attempts,
                                                      min_time_s=args.min_time_s),
                         args.canary_ref_s)
        if row["status"] != "COMPLETE":
            failed.add(key)
        print("ROW " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
