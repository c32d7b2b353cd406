"""``autotune report DIR``: report.md, figures/*.png and a self-contained report.html for a
run directory (``autotune run``) or a bench directory (``autotune bench``).

``autotune.tune.report`` writes a run's report.md as the run ends; this package reads what a run or
a bench left on disk afterwards, draws its figures and renders the page. Matplotlib and
Markdown load with it, so import it only where a report is made.
"""

from autotune.reports._figures import Figure, Report
from autotune.reports._write import ReportFiles, build_report, write_report

__all__ = ["Figure", "Report", "ReportFiles", "build_report", "write_report"]
