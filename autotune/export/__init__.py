"""Exporters: a tuned RunConfig as another trainer's configuration, and importers that read
a user's DeepSpeed or Accelerate config back into a RunConfig.

Every export lists the knobs its target has no setting for and the substitute it chose;
a RunConfig the target cannot express at all is refused with the reason. The targets'
own packages are never imported here: the tests validate the exports with them.

Example:
    >>> from autotune.config import RunConfig
    >>> from autotune.data import load_dataset
    >>> rc = RunConfig()
    >>> facts = Facts.of(rc, load_dataset(rc.workload.data, rc.workload.model.resolve()))
    >>> result = export_runconfig(rc, "deepspeed", facts)
    >>> '"train_micro_batch_size_per_gpu"' in result.text
    True
"""

from autotune.config import RunConfig
from autotune.export._base import EXPORTERS, Exporter, ExportResult, Mapping, Unmapped, live_knobs
from autotune.export._facts import Facts, RowBatch
from autotune.export.accelerate import Accelerate
from autotune.export.deepspeed import DeepSpeed
from autotune.export.megatron import Megatron
from autotune.export.slurm import Slurm
from autotune.export.torchtitan import Torchtitan
from autotune.export.trl import Trl

__all__ = [
    "EXPORTERS", "Accelerate", "DeepSpeed", "ExportResult", "Exporter", "Facts", "Mapping",
    "Megatron", "RowBatch", "Slurm", "Torchtitan", "Trl", "Unmapped", "export_runconfig",
    "live_knobs", "unmapped_report",
]


def export_runconfig(rc: RunConfig, fmt: str, facts: Facts) -> ExportResult:
    """``rc`` in format ``fmt`` (a key of EXPORTERS)."""
    if fmt not in EXPORTERS:
        raise KeyError(f"unknown export format {fmt!r}; choose from {sorted(EXPORTERS)}")
    return EXPORTERS[fmt]().export(rc, facts)


def unmapped_report(result: ExportResult, *, source: str) -> str:
    """What ``source`` became in ``result.format`` beyond a one-to-one copy: the text printed
    by ``autotune export`` and written beside its output file."""
    head = f"# {source} -> {result.format}: knobs without an equivalent, and the substitute\n"
    if not result.unmapped:
        return head + "(none: every knob of the run has an equivalent)\n"
    return head + "".join(u.line() + "\n" for u in result.unmapped)
