"""A throwaway PostgreSQL server on loopback for the scale-out tests: `initdb` into a temporary
folder, `pg_ctl start` on a free port with its socket in that folder, stopped at session end.
`make test` installs Debian's postgresql when missing; elsewhere these tests skip, saying why."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _pg_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's versioned folder (the newest)."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                    key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(debian[-1]).parent if debian else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """``postgresql://postgres@127.0.0.1:PORT/postgres`` of a server that lives as long as
    the test session (trust authentication: loopback only, a throwaway cluster)."""
    pytest.importorskip("psycopg2", reason="psycopg2 (the `test` extra) drives PostgreSQL")
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (`make test` installs Debian's postgresql "
                    "where apt-get runs as root)")
    # Not under pytest's tmp_path: that lives in root's private folder, which the postgres
    # user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="autotune-pg-"))
    data, port = root / "data", _free_port()
    # initdb refuses to run as root: the server runs as the `postgres` OS user then.
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as postgres")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` OS user to run PostgreSQL as")
        shutil.chown(root, user="postgres")
        root.chmod(0o700)
        as_user = ["runuser", "-u", "postgres", "--"]
    init = subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
                           "--auth=trust", "--no-sync", "-E", "UTF8"],
                          capture_output=True, text=True, timeout=120)
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {init.stderr[-2000:]}")
    # fsync off: a throwaway cluster, and the tests measure coordination, not durability.
    opts = f"-k {root} -p {port} -h 127.0.0.1 -c fsync=off -c max_connections=100"
    started = subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l",
                              str(root / "log"), "-o", opts, "-w", "-t", "60", "start"],
                             capture_output=True, text=True, timeout=90)
    if started.returncode != 0:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"pg_ctl start failed: {started.stderr}\n{log[-2000:]}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_database(postgres_url: str, request: pytest.FixtureRequest) -> str:
    """A fresh database of its own for one test, on the session's server."""
    import psycopg2

    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    base = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    conn = psycopg2.connect(base)
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"
