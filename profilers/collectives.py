"""Collective bandwidth: all-reduce, all-gather, reduce-scatter, broadcast and send/recv,
timed over message sizes on N ranks, with an alpha-beta fit per collective.

Run under torchrun (``autotune profile --families collective --nproc N`` does it):

    torchrun --nproc-per-node 2 -m profilers.collectives --out profiles/

Every rank times the same sequence of collectives (a barrier before each size, warm-up
discarded, then repeats until both a count and a time floor are met; CUDA events on GPUs).
Rank 0 records the median of the slowest rank per repeat, since a collective ends when its
last rank does, and writes a parquet table plus the fit.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

import numpy as np

from profilers.store import SCHEMA_VERSION

__all__ = ["COLLECTIVES", "bus_factor", "collective_key", "fit_alpha_beta", "message_bytes",
           "message_sizes"]

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send_recv")


def message_sizes(min_bytes: int = 4096, max_bytes: int = 256 * 2**20) -> list[int]:
    """Powers of two from ``min_bytes`` to ``max_bytes`` inclusive."""
    sizes, n = [], min_bytes
    while n <= max_bytes:
        sizes.append(n)
        n *= 2
    return sizes


def message_bytes(nbytes: int, world: int) -> int:
    """The bytes really sent for a requested size: float32 elements, divisible by the ranks."""
    return max(world, nbytes // 4 // world * world) * 4


def collective_key(name: str, nbytes: int, ranks: int, backend: str) -> str:
    from profilers.ops import case_key

    return case_key({"family": "collective", "collective": name, "bytes": nbytes, "ranks": ranks,
                     "backend": backend})


def bus_factor(collective: str, ranks: int) -> float:
    """nccl-tests' bus bandwidth factor: the fraction of the message each rank's link
    carries, so that bus bandwidth compares collectives and rank counts."""
    n = ranks
    return {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n,
            "reduce_scatter": (n - 1) / n, "broadcast": 1.0, "send_recv": 1.0}[collective]


def fit_alpha_beta(sizes: np.ndarray, times: np.ndarray) -> dict[str, float]:
    """Least squares of t = alpha + beta * bytes, weighted by 1/t so that the small (latency)
    and large (bandwidth) messages count alike. Returns alpha (s), beta (s/byte), the
    bandwidth 1/beta (bytes/s) and the fit's mean absolute percentage error."""
    x, t = np.asarray(sizes, dtype=np.float64), np.asarray(times, dtype=np.float64)
    w = 1.0 / t
    a = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(a, t * w, rcond=None)
    alpha, beta = max(float(alpha), 0.0), max(float(beta), 1e-30)
    pred = alpha + beta * x
    return {"alpha_s": alpha, "beta_s_per_byte": beta, "bandwidth_bytes_per_s": 1.0 / beta,
            "mape": float(np.mean(np.abs(pred - t) / t))}


# ---- the rank side ------------------------------------------------------------------------

def _op(name: str, nbytes: int, rank: int, world: int, device):  # noqa: ANN001, ANN202
    import torch
    import torch.distributed as dist

    elems = message_bytes(nbytes, world) // 4
    buf = torch.ones(elems, dtype=torch.float32, device=device)
    if name == "all_reduce":
        return lambda: dist.all_reduce(buf)
    if name == "broadcast":
        return lambda: dist.broadcast(buf, src=0)
    if name == "all_gather":
        out = torch.empty(elems * world, dtype=torch.float32, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: gather(out, buf)
    if name == "reduce_scatter":
        out = torch.empty(elems // world, dtype=torch.float32, device=device)
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: scatter(out, buf)
    peer = rank ^ 1  # pairs (0,1), (2,3), ...: each pair exchanges one message
    if peer >= world:
        return lambda: None

    def send_recv() -> None:
        if rank % 2 == 0:
            dist.send(buf, peer)
        else:
            dist.recv(buf, peer)
    return send_recv


def _time(fn, device, *, warmup: int, min_iters: int, min_time_s: float,  # noqa: ANN001
          max_iters: int) -> list[float]:
    import torch
    import torch.distributed as dist

    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) / max(warmup, 1)
    # Every rank must run the same number of collectives or the group deadlocks, so the
    # repeat count is agreed once (the largest any rank asks for) instead of each rank
    # watching its own clock.
    want = min(max_iters, max(min_iters, math.ceil(min_time_s / max(per_call, 1e-9))))
    count = torch.tensor([want], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    samples: list[float] = []
    for _ in range(int(count.item())):
        dist.barrier()
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(begin.elapsed_time(end) / 1000.0)
        else:
            t1 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t1)
    return samples


def run_sweep(sizes: list[int], collectives: tuple[str, ...], *, min_iters: int = 5,
              min_time_s: float = 0.05, max_iters: int = 200) -> list[dict] | None:
    """Every rank calls this; rank 0 gets the rows, the others None."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    rows = []
    total = len(sizes) * len(collectives)
    for k, (name, nbytes) in enumerate((c, s) for c in collectives for s in sizes):
        fn = _op(name, nbytes, rank, world, device)
        samples = _time(fn, device, warmup=2, min_iters=min_iters, min_time_s=min_time_s,
                        max_iters=max_iters)
        mine = torch.tensor(samples, dtype=torch.float64, device=device)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        if rank == 0:
            slowest = torch.stack(every).max(0).values.cpu().numpy()
            actual = message_bytes(nbytes, world)
            med = float(np.median(slowest))
            q75, q25 = np.percentile(slowest, [75, 25])
            rows.append({"collective": name, "bytes": actual, "ranks": world,
                         "backend": dist.get_backend(), "median_s": med,
                         "iqr_s": float(q75 - q25), "samples": int(slowest.size),
                         "samples_s": slowest.tolist(), "algbw_bytes_per_s": actual / med,
                         "busbw_bytes_per_s": actual / med * bus_factor(name, world)})
            print(f"[{k + 1}/{total}] {name:15s} {actual:>12,d} B  {med * 1e6:10.1f} us",
                  file=sys.stderr, flush=True)
    return rows if rank == 0 else None


def _write(rows: list[dict], out: Path) -> None:
    """Append the rows the store lacks to its ``collective`` table, then refit every
    collective from all rows for this rank count."""
    import pandas as pd

    from profilers.store import ProfileStore, atomic_write_bytes, atomic_write_text

    store = ProfileStore.existing(out)
    held = store.keys("collective")
    for row in rows:
        row["key"] = collective_key(row["collective"], row["bytes"], row["ranks"], row["backend"])
        row["family"] = "collective"
    store.append("collective", pd.DataFrame([r for r in rows if r["key"] not in held]))
    frame = store.load("collective")
    frame = frame[frame.ranks == rows[0]["ranks"]]
    fits = []
    for name, g in frame.groupby("collective", sort=False):
        # The spread of the samples themselves: a fit error near it is at the noise floor.
        fits.append({"collective": name, "ranks": int(g.ranks.iloc[0]),
                     **fit_alpha_beta(g.bytes.to_numpy(), g.median_s.to_numpy()),
                     "median_rel_iqr": float((g.iqr_s / g.median_s).median())})
    buf = io.BytesIO()
    pd.DataFrame(fits).assign(schema_version=SCHEMA_VERSION, fingerprint=store.fingerprint_key
                              ).to_parquet(buf, index=False)
    atomic_write_bytes(out / "collective_fit.parquet", buf.getvalue())
    lines = ["| collective | ranks | alpha (us) | bandwidth (GB/s) | fit MAPE | sample IQR/median |",
             "|---|---:|---:|---:|---:|---:|"]
    for f in fits:
        lines.append(f"| {f['collective']} | {f['ranks']} | {f['alpha_s'] * 1e6:.1f} | "
                     f"{f['bandwidth_bytes_per_s'] / 1e9:.2f} | {f['mape']:.1%} | "
                     f"{f['median_rel_iqr']:.0%} |")
    atomic_write_text(out / "collective_fit.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.distributed as dist

    p = argparse.ArgumentParser(prog="python -m profilers.collectives")
    p.add_argument("--out", required=True)
    p.add_argument("--min-bytes", type=int, default=4096)
    p.add_argument("--max-bytes", type=int, default=256 * 2**20)
    p.add_argument("--collectives", default=",".join(COLLECTIVES))
    p.add_argument("--min-time-s", type=float, default=0.05)
    args = p.parse_args(argv)
    names = tuple(args.collectives.split(","))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        rows = run_sweep(message_sizes(args.min_bytes, args.max_bytes), names,
                         min_time_s=args.min_time_s)
        if rows is not None:
            _write(rows, Path(args.out))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
