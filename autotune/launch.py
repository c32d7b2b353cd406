"""Starting ranks: PyTorch's own launcher (torchrun, c10d rendezvous), never a home-made one."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from autotune.config import RunConfig
from autotune.errors import UserError

__all__ = ["Launch", "check_host_capacity"]

# A CPU rank needs its Python and torch runtime (~0.4 GiB) plus work; beyond four ranks per
# core they mostly wait for each other.
_CPU_RANK_GIB = 0.5
_CPU_RANKS_PER_CORE = 4


@dataclass(frozen=True)
class Launch:
    """How many ranks, on how many nodes. ``nproc`` is per node."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    @classmethod
    def for_config(cls, rc: RunConfig, *, nproc: int | None = None, nnodes: int | None = None,
                   node_rank: int = 0, rdzv_endpoint: str | None = None) -> Launch:
        hw = rc.workload.hardware
        launch = cls(nproc or hw.devices_per_node, nnodes or hw.nodes, node_rank, rdzv_endpoint)
        world = launch.nproc * launch.nnodes
        if world != rc.parallel.world_size:
            raise UserError(f"{launch.nproc} processes x {launch.nnodes} nodes = {world} ranks, "
                            f"but dp*tp*pp*cp = {rc.parallel.world_size}")
        check_host_capacity(launch.nproc, rc.workload.hardware.device)
        return launch

    def __post_init__(self) -> None:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT of the first node")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank} is not below --nnodes {self.nnodes}")

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes

    def argv(self, module: str, args: list[str]) -> list[str]:
        """The command line: plain Python for one rank, torchrun for more."""
        if self.world == 1:
            return [sys.executable, "-m", module, *args]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.nproc}",
               f"--nnodes={self.nnodes}", "--max-restarts=0"]
        if self.nnodes == 1 and self.rdzv_endpoint is None:
            cmd.append("--standalone")
        else:
            cmd += [f"--node-rank={self.node_rank}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={self.rdzv_endpoint}"]
        return [*cmd, "-m", module, *args]


def check_host_capacity(nproc: int, device: str) -> None:
    """Refuse, before anything starts, more ranks than this machine can host."""
    if device == "cuda":
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if nproc > have:
            raise UserError(f"{nproc} ranks per node need {nproc} CUDA devices; this machine "
                            f"has {have}")
        return
    import psutil

    cores = os.cpu_count() or 1
    if nproc > _CPU_RANKS_PER_CORE * cores:
        raise UserError(f"{nproc} CPU ranks on {cores} cores: at most "
                        f"{_CPU_RANKS_PER_CORE * cores} ranks per node here")
    avail = psutil.virtual_memory().available / 2**30
    if nproc * _CPU_RANK_GIB > avail:
        raise UserError(f"{nproc} CPU ranks need about {nproc * _CPU_RANK_GIB:.1f} GiB; "
                        f"{avail:.1f} GiB is available")
