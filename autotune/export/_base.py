"""The exporter contract: a RunConfig in, a target's config text out, with every knob the
target cannot carry named beside the substitute chosen for it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from autotune.config import POLICY_KNOBS, RunConfig
from autotune.export._facts import Facts

__all__ = ["EXPORTERS", "ExportResult", "Exporter", "Mapping", "Unmapped", "live_knobs"]

EXPORTERS: dict[str, type[Exporter]] = {}


@dataclass(frozen=True)
class Unmapped:
    """A RunConfig knob the target has no setting for, and what the export does instead."""

    knob: str
    substitute: str
    why: str

    def line(self) -> str:
        return f"{self.knob}: nearest: {self.substitute} ({self.why})"


@dataclass(frozen=True)
class ExportResult:
    """``text`` is None exactly when ``refused`` says why the target cannot express the run."""

    format: str
    text: str | None
    unmapped: tuple[Unmapped, ...] = ()
    refused: tuple[str, ...] = ()
    mapped: tuple[str, ...] = ()


def live_knobs(rc: RunConfig) -> dict[str, Any]:
    """The knobs that shape this run, dotted name to value: those that other knobs make
    irrelevant (chunk_size outside chunkflow, zero_stage on one replica, ...) are left out,
    so an export is never blamed for dropping a setting that does nothing."""
    s, p, ck, k, o = rc.schedule, rc.parallel, rc.checkpointing, rc.kernels, rc.optimizer
    knobs: dict[str, Any] = {"schedule.policy": s.policy}
    knobs |= {f"schedule.{name}": getattr(s, name) for name in POLICY_KNOBS[s.policy]}
    knobs["workload.budget.global_batch_tokens"] = rc.workload.budget.global_batch_tokens
    knobs |= {f"parallel.{d}": getattr(p, d) for d in ("dp", "tp", "pp", "cp")}
    if p.cp > 1:
        knobs["schedule.cp_placement"] = s.cp_placement
    if p.dp > 1:
        knobs["schedule.rank_split"] = s.rank_split
    if p.dp * p.cp > 1:  # ZeRO shards, and gradients reduce, over dp x cp
        knobs["parallel.zero_stage"] = p.zero_stage
        if p.grad_reduce != "auto":  # auto is what trainers do by default
            knobs["parallel.grad_reduce"] = p.grad_reduce
    if p.pp > 1:
        knobs["parallel.pp_schedule"] = p.pp_schedule
    knobs["checkpointing.policy"] = ck.policy
    if ck.policy in ("selective", "adaptive"):
        knobs["checkpointing.fraction"] = ck.fraction
    if ck.policy == "adaptive":
        knobs["checkpointing.memory_budget_gb"] = ck.memory_budget_gb
    knobs |= {"kernels.attention": k.attention, "kernels.loss": k.loss, "kernels.norm": k.norm}
    if k.configs:
        knobs["kernels.configs"] = k.configs
    knobs["precision.dtype"] = rc.precision.dtype
    if rc.compile != "none":
        knobs["compile"] = rc.compile
    cosine_only = ("decay_steps", "min_lr_ratio")
    knobs |= {f"optimizer.{n}": getattr(o, n) for n in type(o).model_fields
              if o.lr_schedule == "cosine" or n not in cosine_only}
    knobs["seed"] = rc.seed
    return knobs


@dataclass
class Mapping:
    """What an exporter did with each live knob: carried as is, or substituted."""

    knobs: dict[str, Any]
    carried: list[str] = field(default_factory=list)
    unmapped: list[Unmapped] = field(default_factory=list)

    def carry(self, *names: str) -> None:
        self.carried += [n for n in names if n in self.knobs]

    def substitute(self, name: str, substitute: str, why: str) -> None:
        if name in self.knobs:
            self.unmapped.append(Unmapped(f"{name}={self._show(name)}", substitute, why))

    def _show(self, name: str) -> str:
        value = self.knobs[name]
        return "none" if value is None else str(value)

    def handled(self) -> set[str]:
        return set(self.carried) | {u.knob.split("=", 1)[0] for u in self.unmapped}


class Exporter(ABC):
    """Turns a valid RunConfig into one target's configuration.

    ``render`` returns the text and records, on the Mapping, every live knob (see
    ``live_knobs``) it carried or substituted; ``export`` lists the knobs it did neither as
    not carried, with ``leftover`` saying where such a setting lives in that target.
    ``refusals`` names what the target cannot express at all: a refused RunConfig gets no
    text. Subclasses set ``name`` (the ``--format`` value) and ``suffix`` (of the file).
    """

    name: ClassVar[str]
    suffix: ClassVar[str]
    leftover: ClassVar[str] = "the training script"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            EXPORTERS[cls.name] = cls

    def refusals(self, rc: RunConfig, facts: Facts) -> list[str]:
        """Why the target cannot run this config at all; empty when it can."""
        return []

    @abstractmethod
    def render(self, rc: RunConfig, facts: Facts, m: Mapping) -> str:
        """The target's config text."""

    def export(self, rc: RunConfig, facts: Facts) -> ExportResult:
        refused = self.refusals(rc, facts)
        if refused:
            return ExportResult(self.name, None, refused=tuple(refused))
        m = Mapping(live_knobs(rc))
        text = self.render(rc, facts, m)
        for name in m.knobs.keys() - m.handled():
            m.substitute(name, "not set", f"{self.name} has no setting for it; it belongs "
                                         f"in {self.leftover}")
        order = list(m.knobs)
        unmapped = sorted(m.unmapped, key=lambda u: order.index(u.knob.split("=", 1)[0]))
        return ExportResult(self.name, text, unmapped=tuple(unmapped),
                            mapped=tuple(sorted(set(m.carried), key=order.index)))
