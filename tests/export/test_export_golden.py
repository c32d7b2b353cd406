"""Golden files pin every export's text and its list of substitutes, so that a change in
what a target receives shows in review, including for targets that cannot be installed
here. Regenerate after an intended change with AUTOTUNE_UPDATE_GOLDEN=1 and read the diff."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from export_cases import facts_of, runconfig

from autotune.export import EXPORTERS, export_runconfig, unmapped_report

GOLDEN = Path(__file__).parent / "golden"
# A one-rank CPU run, a tensor-parallel chunkflow run and a pipeline (where Accelerate and
# TRL refuse): between them every exporter's main branches.
CASES = ("padmax-cpu-one-rank", "chunkflow-dp2-tp2-zero2-selective", "sorted-dp2-pp2-zero1-gpipe")
PAIRS = [(c, f) for c in CASES for f in sorted(EXPORTERS)
         if not (c == "sorted-dp2-pp2-zero1-gpipe" and f in ("accelerate", "trl"))]


def _check(path: Path, text: str) -> None:
    if os.environ.get("AUTOTUNE_UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"{path.name} missing: run with AUTOTUNE_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), f"{path.name} changed"


@pytest.mark.parametrize("case, fmt", PAIRS)
def test_export_matches_golden(case: str, fmt: str) -> None:
    rc = runconfig(case)
    result = export_runconfig(rc, fmt, facts_of(rc))
    stem = f"{case}.{fmt}"
    _check(GOLDEN / f"{stem}{EXPORTERS[fmt].suffix}", result.text)
    _check(GOLDEN / f"{stem}.unmapped.txt", unmapped_report(result, source="run.yaml"))
