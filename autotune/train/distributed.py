"""The process group and device mesh of a run, from torchrun's environment and the RunConfig."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from autotune.config import RunConfig

__all__ = ["ParallelContext", "fake_parallel", "init_parallel", "results_written",
           "shutdown_parallel"]

MESH_DIMS = ("pp", "dp", "tp")  # outermost to innermost, as torchtitan orders them
MESH_DIMS_CP = ("pp", "dp", "cp", "tp")  # with context parallelism


@dataclass
class ParallelContext:
    """Where this process sits: its device, its coordinates on the (pp, dp, tp) mesh, and
    the sub-meshes each parallelism uses. A single process has a context too (no mesh)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    pp: int = 1
    dp: int = 1
    tp: int = 1
    pp_rank: int = 0
    dp_rank: int = 0
    tp_rank: int = 0
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh when world > 1
    cp: int = 1
    cp_rank: int = 0

    @property
    def replicas(self) -> int:
        """Ranks holding the same parameters of a stage and tp shard: data-parallel replicas
        times the ranks of a context-parallel group (each runs its own tokens)."""
        return self.dp * self.cp

    def replica_mesh(self) -> Any:
        """The mesh FSDP2 and replicate reduce gradients over: dp, flattened with cp."""
        return self.mesh["dp_cp"] if self.cp > 1 else self.mesh["dp"]

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def submesh(self, name: str) -> Any:
        return self.mesh[name]

    def group(self, name: str) -> Any:
        return self.mesh.get_group(name)


def _device(kind: str) -> torch.device:
    if kind == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        # "fp32" means TF32 tensor cores on GPUs (as the datasheet table and the measured
        # ceiling do): full-precision fp32 matmuls run at ~1/15 of that on an H100.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", local)
    return torch.device("cpu")


def _cpu_threads(rc: RunConfig) -> None:
    # Ranks sharing a machine must share its cores: oversubscribed OpenMP pools spin against
    # each other and run an order of magnitude slower.
    if rc.workload.hardware.cpu_threads:
        torch.set_num_threads(rc.workload.hardware.cpu_threads)
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def init_parallel(rc: RunConfig) -> ParallelContext:
    """Join the process group torchrun set up (if any) and build the device mesh."""
    # FSDP2 warns when a wrapped module returns views: ChunkFlow's per-layer keys and values
    # of segment 0 are slices that are only ever read (copied into the chunk state).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    kind = rc.workload.hardware.device
    _cpu_threads(rc)
    device = _device(kind)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    p = rc.parallel
    if world != p.world_size:
        raise RuntimeError(f"launched with {world} ranks but dp*tp*pp*cp = {p.world_size}")
    if world == 1:
        return ParallelContext(device=device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", device_id=(
            device if kind == "cuda" else None))
    mesh, coords = _mesh(kind, p)
    return ParallelContext(device=device, rank=dist.get_rank(), world=world, pp=p.pp, dp=p.dp,
                           tp=p.tp, pp_rank=coords[0], dp_rank=coords[1], tp_rank=coords[-1],
                           mesh=mesh, cp=p.cp, cp_rank=coords[2] if p.cp > 1 else 0)


def _mesh(kind: str, p: Any) -> tuple[Any, list[int]]:
    """The (pp, dp, tp) mesh, or (pp, dp, cp, tp) with dp and cp flattened into dp_cp for
    the gradient reduction (torchtitan's layout)."""
    from torch.distributed.device_mesh import init_device_mesh

    if p.cp == 1:
        mesh = init_device_mesh(kind, (p.pp, p.dp, p.tp), mesh_dim_names=MESH_DIMS)
    else:
        mesh = init_device_mesh(kind, (p.pp, p.dp, p.cp, p.tp), mesh_dim_names=MESH_DIMS_CP)
        mesh["dp", "cp"]._flatten("dp_cp")
    return mesh, mesh.get_coordinate()


@contextlib.contextmanager
def fake_parallel(rc: RunConfig, *, rank: int = 0) -> Iterator[ParallelContext]:
    """This process as rank ``rank`` of ``rc``'s whole world, under ``FakeTensorMode`` on
    torch's fake process group (collectives return at once, moving nothing), with a CPU
    device mesh: a real-size model is built, sharded and stepped exactly as that rank would,
    on a machine without its devices, and no tensor holds memory. Fake tensors are on the
    CPU: torch's CPU build cannot run autograd over fake CUDA tensors (its engine asks for a
    CUDA device guard), and the GPU kernels' fake implementations give the same shapes on
    either device. Tears the group down afterwards."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    p = rc.parallel
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    dist.init_process_group("fake", rank=rank, world_size=p.world_size, store=FakeStore())
    try:
        mesh, coords = _mesh("cpu", p)
        # Meta tensors (the model before to_empty) become fake ones on entry.
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield ParallelContext(device=torch.device("cpu"), rank=rank, world=p.world_size,
                                  pp=p.pp, dp=p.dp, tp=p.tp, pp_rank=coords[0],
                                  dp_rank=coords[1], tp_rank=coords[-1], mesh=mesh, cp=p.cp,
                                  cp_rank=coords[2] if p.cp > 1 else 0)
    finally:
        dist.destroy_process_group()


def results_written(ctx: ParallelContext) -> None:
    """Call on every rank once rank 0 has written its results, before ``shutdown_parallel``
    on the success path: peers that tear down while rank 0 still writes have aborted in
    gloo's teardown ("terminate called without an active exception") and taken rank 0 with
    them. Not on a failure path, where a peer may never arrive."""
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def shutdown_parallel(ctx: ParallelContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
