"""Errors that the command line turns into one line and exit code 2."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input from the user: a config, a data file, a flag.

    The message is one line that names the problem and where it is; the CLI prints it
    without a traceback and exits with code 2. Raise it only for input the user can fix,
    never for a bug in autotune.
    """
