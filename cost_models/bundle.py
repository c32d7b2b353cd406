"""Everything the step model needs, as one folder: the device's ceilings, one model per op
family, the collective fits, the step residual and the memory model.

    models/
      models.json                  version, fingerprint, device, ceilings, families
      <family>.json, .meta.json    per-family XGBoost (cost_models.family)
      <family>.ranker.json, .meta.json   kernel-config ranker, where the profile allows
      collective_fit.parquet       alpha-beta per collective and group size, when profiled
      step_residual.json, .meta.json
      memory.meta.json

Loading refuses a folder fitted under another fingerprint or feature version, naming both.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cost_models.family import FamilyModel, FamilyRanker, ModelMismatch
from cost_models.features import FEATURE_VERSION, Ceilings
from cost_models.gpu_prior import CollectivePrior, OpPrior
from cost_models.step import STEP_MODEL_VERSION, MemoryModel, ResidualModel

__all__ = ["MANIFEST", "StepModels"]

MANIFEST = "models.json"


@dataclass
class StepModels:
    fingerprint: str
    device: str  # "cpu" or "cuda"
    ceilings: Ceilings
    families: dict[str, FamilyModel] = field(default_factory=dict)
    collective_fits: pd.DataFrame | None = None
    residual: ResidualModel | None = None
    memory: MemoryModel | None = None
    rankers: dict[str, FamilyRanker] = field(default_factory=dict)
    # The GPU prior (cited public measurements) for the families and collectives the fitted
    # models do not cover; None on CPUs, where the roofline on measured ceilings stands in.
    op_prior: OpPrior | None = None
    collective_prior: CollectivePrior | None = None

    def __post_init__(self) -> None:
        if self.residual is None:
            self.residual = ResidualModel(self.fingerprint)
        if self.memory is None:
            self.memory = MemoryModel(self.fingerprint)

    @property
    def calibration(self) -> str:
        """"measured" once real steps calibrated the composition, else "prior-only"."""
        return "measured" if self.residual.n_measurements else "prior-only"

    def sources(self) -> dict[str, str]:
        out = {f: f"{m.kind} ({m.n_train} cases)" for f, m in self.families.items()}
        if self.op_prior is not None:
            out |= self.op_prior.sources()
        out["ceilings"] = self.ceilings.source
        out["step_residual"] = f"{self.residual.n_measurements} measured steps"
        out["memory"] = f"{self.memory.n_measurements} {self.memory.kind} peaks"
        return out

    def save(self, folder: Path) -> None:
        from profilers.store import atomic_write_bytes, atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for model in self.families.values():
            model.save(folder)
        for ranker in self.rankers.values():
            ranker.save(folder)
        if self.collective_fits is not None:
            buf = io.BytesIO()
            self.collective_fits.to_parquet(buf, index=False)
            atomic_write_bytes(folder / "collective_fit.parquet", buf.getvalue())
        self.residual.save(folder)
        self.memory.save(folder)
        manifest = {"version": STEP_MODEL_VERSION, "feature_version": FEATURE_VERSION,
                    "fingerprint": self.fingerprint, "device": self.device,
                    "ceilings": {"flops_per_s": self.ceilings.flops_per_s,
                                 "bytes_per_s": self.ceilings.bytes_per_s,
                                 "source": self.ceilings.source},
                    "families": sorted(self.families), "rankers": sorted(self.rankers)}
        atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, fingerprint: str | None = None) -> StepModels:
        """The models in ``folder``; with ``fingerprint``, refused unless fitted under it."""
        folder = Path(folder)
        path = folder / MANIFEST
        try:
            manifest = json.loads(path.read_text())
            fp = manifest["fingerprint"]
        except FileNotFoundError:
            raise ModelMismatch(f"{folder} holds no fitted models ({MANIFEST} is missing); run "
                                f"`autotune fit --profiles DIR --out {folder}`") from None
        except (ValueError, KeyError, TypeError):
            raise ModelMismatch(f"{path} is not a models manifest; re-run `autotune fit`") from None
        if manifest.get("feature_version") != FEATURE_VERSION:
            raise ModelMismatch(f"{path}: fitted on feature version {manifest.get('feature_version')},"
                                f" this autotune uses {FEATURE_VERSION}; re-run `autotune fit`")
        if fingerprint is not None and fp != fingerprint:
            raise ModelMismatch(f"{path}: fitted on fingerprint {fp}, this machine is "
                                f"{fingerprint}; fit on this machine's profiles")
        c = manifest["ceilings"]
        ceilings = Ceilings({k: float(v) for k, v in c["flops_per_s"].items()},
                            float(c["bytes_per_s"]), c.get("source", "measured"))
        families = {f: FamilyModel.load(folder, f, fp) for f in manifest["families"]}
        fits_path = folder / "collective_fit.parquet"
        fits = pd.read_parquet(fits_path) if fits_path.exists() else None
        rankers = {f: FamilyRanker.load(folder, f, fp) for f in manifest.get("rankers", [])}
        return cls(fp, manifest["device"], ceilings, families, fits,
                   ResidualModel.load(folder, fp), MemoryModel.load(folder, fp), rankers)
