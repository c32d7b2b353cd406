"""The ``autotune`` command line.

Exit codes: 0 success, 1 the work failed, 2 bad input (one line per problem, no traceback).
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence

from autotune.environment import check_kernels_package
from autotune.errors import StorageFailure, UserError
from profilers.ceilings import CeilingError

__all__ = ["main"]

# Where an output cannot be written for the machine's sake, not the input's.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2, like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def _build() -> argparse.ArgumentParser:
    from autotune.cli import (
        bench_cmd,
        export_cmd,
        fit_cmd,
        import_cmd,
        kernels_cmd,
        measure_cmd,
        memory_cmd,
        predict_cmd,
        profile_cmd,
        report_cmd,
        run_cmd,
        trace_cmd,
        train_cmd,
        worker_cmd,
    )

    parser = _Parser(prog="autotune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (run_cmd, train_cmd, measure_cmd, profile_cmd, trace_cmd, fit_cmd,
                   predict_cmd, memory_cmd, kernels_cmd, bench_cmd, report_cmd, export_cmd, import_cmd,
                   worker_cmd):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        check_kernels_package()
        parser = _build()
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        return int(args.func(args) or 0)
    except UserError as exc:
        for line in str(exc).splitlines():
            print(f"autotune: error: {line}", file=sys.stderr)
        return 2
    except (StorageFailure, CeilingError) as exc:
        print(f"autotune: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("autotune: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # A full, read-only or forbidden output location: the work failed (exit 1), said in
        # one line; the atomic writes leave no half-written file behind.
        if exc.errno not in _STORAGE_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"autotune: error: cannot write: {where}{exc.strerror}", file=sys.stderr)
        return 1
