"""Slurm: an sbatch script that trains the RunConfig with autotune's own trainer on the
allocated nodes, one torchrun per node meeting at a c10d rendezvous on the first node."""

from __future__ import annotations

import shlex

from autotune.config import RunConfig
from autotune.export._base import Exporter, Mapping
from autotune.export._facts import Facts

__all__ = ["DEFAULT_PORT", "DEFAULT_STEPS", "Slurm"]

DEFAULT_STEPS = 20  # as `autotune train`
DEFAULT_PORT = 29500  # torchrun's own default rendezvous port


class Slurm(Exporter):
    """Every knob travels: the job runs the RunConfig file itself.

    ``autotune train`` starts torchrun itself, once per machine; under Slurm, srun starts
    one torchrun per node instead, each running the per-rank worker
    (``python -m autotune.train.worker RUNCONFIG --mode train``) exactly as
    ``autotune train`` has its torchrun run it. Rank 0 writes the run's summary JSON into the
    submission folder.
    """

    name = "slurm"
    suffix = ".sbatch"

    def refusals(self, rc: RunConfig, facts: Facts) -> list[str]:
        if facts.runconfig_path is None:
            return ["slurm: the script trains a RunConfig file; give its path"]
        return []

    def render(self, rc: RunConfig, facts: Facts, m: Mapping) -> str:
        m.carry(*m.knobs)
        hw = rc.workload.hardware
        per_node = "GPU" if hw.device == "cuda" else "CPU rank"
        resources = [f"#SBATCH --nodes={hw.nodes}", "#SBATCH --ntasks-per-node=1"]
        if hw.device == "cuda":
            resources.append(f"#SBATCH --gpus-per-node={hw.devices_per_node}")
        elif hw.cpu_threads:
            resources.append(f"#SBATCH --cpus-per-task={hw.devices_per_node * hw.cpu_threads}")
        lines = [
            "#!/bin/bash",
            f"# autotune train {rc.label()}: {hw.nodes} node(s) x {hw.devices_per_node} "
            f"{per_node}(s), one torchrun per node, c10d rendezvous on the first node.",
            "# Submit from the environment autotune is installed in (sbatch passes it on).",
            f"# Set STEPS (default {DEFAULT_STEPS}) or MASTER_PORT (default {DEFAULT_PORT}) "
            "to change them.",
            "#SBATCH --job-name=autotune-train", *resources,
            "#SBATCH --output=autotune-train-%j.out",
            "set -euo pipefail",
            "",
            f"RUNCONFIG={shlex.quote(str(facts.runconfig_path))}",
            # A smaller allocation than the config's would leave the rendezvous waiting forever.
            f'if [ "${{SLURM_NNODES}}" -ne {hw.nodes} ]; then',
            f'    echo "autotune: the RunConfig wants {hw.nodes} node(s); the allocation has '
            '${SLURM_NNODES}" >&2',
            "    exit 2",
            "fi",
            # sed, not head: head exits early and, under pipefail, scontrol's SIGPIPE would
            # end the job.
            'head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | sed -n 1p)',
            "",
            'srun --nodes="${SLURM_NNODES}" --ntasks-per-node=1 \\',
            f'    torchrun --nnodes="${{SLURM_NNODES}}" --nproc-per-node={hw.devices_per_node} \\',
            '    --rdzv-id="${SLURM_JOB_ID}" --rdzv-backend=c10d \\',
            f'    --rdzv-endpoint="${{head_node}}:${{MASTER_PORT:-{DEFAULT_PORT}}}" '
            "--max-restarts=0 \\",
            f'    -m autotune.train.worker "${{RUNCONFIG}}" --mode train '
            f'--steps "${{STEPS:-{DEFAULT_STEPS}}}" \\',
            '    --out "${SLURM_SUBMIT_DIR}/autotune-train-${SLURM_JOB_ID}.json"',
        ]
        return "\n".join(lines) + "\n"
