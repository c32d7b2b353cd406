"""Errors that the command line turns into one line and exit code 2."""

from __future__ import annotations

__all__ = ["StorageFailure", "UserError"]


class UserError(ValueError):
    """Bad input from the user: a config, a data file, a flag.

    The message is one line that names the problem and where it is; the CLI prints it
    without a traceback and exits with code 2. Raise it only for input the user can fix,
    never for a bug in autotune.
    """


class StorageFailure(RuntimeError):
    """The study's storage stopped taking or giving results mid-run (a full disk, a database
    server gone). The work failed: the CLI prints the one-line message and exits with code
    1; every measurement recorded before is kept, and the same command resumes the run."""
