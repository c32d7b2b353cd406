"""Which kind of directory a report is for, and writing its files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autotune.errors import UserError
from autotune.reports._bench import BenchDir, bench_report
from autotune.reports._figures import Report
from autotune.reports._html import render_html
from autotune.reports._run import RunRecord, run_report
from profilers.store import atomic_write_bytes, atomic_write_text

__all__ = ["ReportFiles", "build_report", "write_report"]


@dataclass(frozen=True, slots=True)
class ReportFiles:
    """What ``write_report`` wrote; ``missing`` names the figures it could not draw."""

    markdown: Path
    html: Path
    figures: list[Path]
    missing: list[str]


def build_report(path: Path) -> Report:
    """The report of a run or bench directory; nothing is written, every input is checked.

    Raises:
        UserError: ``path`` is neither kind of directory, or one of its files is unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such directory")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; give a run or bench directory")
    if (path / "suite.yaml").is_file() and (path / "runs").is_dir():
        return bench_report(BenchDir.load(path))
    if (path / "report.md").is_file() and (path / "summary.json").is_file():
        return run_report(RunRecord.load(path))
    raise UserError(f"{path}: neither a run directory (report.md and summary.json, from "
                    f"`autotune run`) nor a bench directory (suite.yaml and runs/, from "
                    f"`autotune bench`)")


def write_report(path: Path) -> ReportFiles:
    """report.md, figures/<name>.png and a self-contained report.html in ``path``.

    Example:
        >>> files = write_report(Path("results/runs/my-run"))  # doctest: +SKIP
        >>> files.html.name
        'report.html'
    """
    path = Path(path)
    report = build_report(path)
    written = []
    for f in report.figures:
        if f.png is not None:
            written.append(atomic_write_bytes(path / f.path, f.png))
        else:
            # An earlier report's plot of data that is gone would contradict this report.
            (path / f.path).unlink(missing_ok=True)
    md = atomic_write_text(path / "report.md", report.markdown)
    page = render_html(report.markdown, title=report.title,
                       images={f.path: f.png for f in report.figures if f.png is not None})
    return ReportFiles(md, atomic_write_text(path / "report.html", page), written,
                       [f.name for f in report.figures if f.png is None])
