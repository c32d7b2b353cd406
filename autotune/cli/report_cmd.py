"""``autotune report DIR``: the figures of a run or bench directory, added to its report.md
and rendered with it into one self-contained report.html."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="report.md, figures and a self-contained report.html "
                                      "of a run or bench directory")
    p.add_argument("dir", metavar="DIR",
                   help="a run directory (`autotune run`) or a bench directory (`autotune bench`)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autotune.reports import write_report

    files = write_report(Path(args.dir))
    skipped = f"; not drawn, data absent: {', '.join(files.missing)}" if files.missing else ""
    n = len(files.figures)
    print(f"report: {files.markdown} and {files.html} ({n} figure{'' if n == 1 else 's'} in "
          f"{files.markdown.parent / 'figures'}{skipped})")
    return 0
