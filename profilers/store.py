"""Files written so that a crash never leaves half of one behind, and the profile store
built on them."""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    import pandas as pd

__all__ = ["SCHEMA_VERSION", "ProfileStore", "StoreError", "atomic_write_bytes", "atomic_write_text"]


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; a result file should have the permissions open() would give.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


# ---- the profile store --------------------------------------------------------------------

SCHEMA_VERSION = 1
_MANIFEST = "store.json"


class StoreError(ValueError):
    """A profile store that cannot be used as asked: one line naming the file and the fix."""


class ProfileStore:
    """Measurement tables on disk, one folder of parquet parts per family.

    ``root/store.json`` names the schema version and the environment fingerprint the store
    belongs to; every row carries both as columns too, so a part copied in from elsewhere is
    caught. A store holds one fingerprint only: figures from two machines (or two thread
    counts) never mix in one table. Parts are written whole (temporary file, fsync, rename)
    and never rewritten, so an interrupted writer loses at most the rows it had not yet
    flushed, and a reader never sees half a file.
    """

    def __init__(self, root: Path, fingerprint_key: str, fingerprint: dict | None = None) -> None:
        self.root = Path(root)
        self.fingerprint_key = fingerprint_key
        self._fingerprint = fingerprint or {}

    @classmethod
    def open(cls, root: Path, fingerprint_key: str, fingerprint: dict | None = None,
             *, create: bool = True) -> ProfileStore:
        """The store at ``root`` for this fingerprint; refuses a store of another fingerprint
        or schema version. Creates it when missing and ``create`` is set."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise StoreError(f"profile store {root} is a file, not a folder; choose another --out")
        manifest = cls._read_manifest(root)
        if manifest is None:
            if not create:
                raise StoreError(f"{root} holds no profile store ({_MANIFEST} missing); "
                                 f"run `autotune profile --out {root}` first")
            store = cls(root, fingerprint_key, fingerprint)
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(root / _MANIFEST, json.dumps(
                {"schema_version": SCHEMA_VERSION, "fingerprint_key": fingerprint_key,
                 "fingerprint": fingerprint or {}}, indent=2) + "\n")
            return store
        if manifest["fingerprint_key"] != fingerprint_key:
            raise StoreError(f"profile store {root} holds fingerprint {manifest['fingerprint_key']}, "
                             f"this environment is {fingerprint_key}; figures of two environments "
                             f"never mix: use another --out")
        return cls(root, fingerprint_key, manifest.get("fingerprint"))

    @classmethod
    def existing(cls, root: Path) -> ProfileStore:
        """The store at ``root`` with the fingerprint it was created for (for a child process
        writing on behalf of the command that opened it)."""
        manifest = cls._read_manifest(Path(root))
        if manifest is None:
            raise StoreError(f"{root} holds no profile store ({_MANIFEST} missing)")
        return cls(Path(root), manifest["fingerprint_key"], manifest.get("fingerprint"))

    @staticmethod
    def _read_manifest(root: Path) -> dict | None:
        path = root / _MANIFEST
        try:
            manifest = json.loads(path.read_text())
            version, key = manifest["schema_version"], manifest["fingerprint_key"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"{path} is not a profile store manifest; delete the folder "
                             f"to re-profile") from None
        if version != SCHEMA_VERSION:
            raise StoreError(f"profile store {root} has schema version {version}, this autotune "
                             f"reads version {SCHEMA_VERSION}; re-profile into a new --out")
        if not isinstance(key, str):
            raise StoreError(f"{path}: fingerprint_key is not a string")
        return manifest

    @property
    def fingerprint(self) -> dict:
        return dict(self._fingerprint)

    def families(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and any(p.glob("*.parquet")))

    def parts(self, family: str) -> list[Path]:
        return sorted((self.root / family).glob("part-*.parquet"))

    def append(self, family: str, frame: pd.DataFrame) -> Path | None:
        """Write ``frame`` as a new part of ``family``'s table; returns its path (None for an
        empty frame)."""
        if frame.empty:
            return None
        frame = frame.assign(schema_version=SCHEMA_VERSION, fingerprint=self.fingerprint_key)
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        # Unique across processes and restarts; sorting the names keeps write order.
        name = f"part-{time.time_ns():020d}-{os.getpid()}.parquet"
        return atomic_write_bytes(self.root / family / name, buf.getvalue())

    def load(self, family: str) -> pd.DataFrame:
        """Every row of ``family``, parts in write order; refuses unreadable parts and rows of
        another schema version or fingerprint, naming the file."""
        import pandas as pd

        frames = []
        for part in self.parts(family):
            try:
                frame = pd.read_parquet(part)
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise StoreError(f"{part} is not a readable parquet file ({type(exc).__name__}); "
                                 f"delete it and re-run `autotune profile` to re-measure what it "
                                 f"held") from None
            self._check_part(part, frame)
            frames.append(frame)
        if not frames:
            return pd.DataFrame()
        return pd.concat(frames, ignore_index=True)

    def rows(self, family: str) -> int:
        """How many rows ``family`` holds, from the parts' footers alone (no data read)."""
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(part).num_rows for part in self.parts(family))

    def keys(self, family: str) -> set[str]:
        table = self.load(family)
        return set(table["key"]) if "key" in table else set()

    def missing_ceilings(self, dtypes: Iterable[str]) -> list[str]:
        """Keys of the ``ceiling`` rows the cost models need for ``dtypes`` (a matmul rate per
        dtype, the copy bandwidth) that the store does not hold yet."""
        held = self.keys("ceiling")
        return [k for k in (*(f"matmul:{d}" for d in dtypes), "copy") if k not in held]

    def record_ceilings(self, dtypes: Iterable[str], device_kind: str, *,
                        package_version: str) -> list[str]:
        """Append the ceilings of ``missing_ceilings(dtypes)``, the roofline the cost models'
        prior divides by, measured on this machine (once per machine: profilers.ceilings
        caches them); returns their keys.

        Raises:
            StoreError: the store belongs to another environment than this process's, whose
                figures would describe the wrong device.
        """
        import pandas as pd

        from profilers import ceilings
        from profilers.fingerprint import current_fingerprint

        missing = self.missing_ceilings(dtypes)
        if not missing:
            return []
        try:
            here = current_fingerprint(device_kind, package_version).key()  # type: ignore[arg-type]
        except ValueError:  # a GPU store read on a machine without one
            here = None
        if here != self.fingerprint_key:
            this = f"this machine is {here}" if here else f"this machine has no {device_kind} device"
            raise StoreError(
                f"profile store {self.root} holds no ceilings of its device yet ({', '.join(missing)}; "
                f"a sweep stores them when it completes), and they can be measured only on the "
                f"machine it was taken on (fingerprint {self.fingerprint_key}; {this}): finish the "
                f"sweep there with `autotune profile --out {self.root}` and the flags it started "
                f"with, which resumes it")
        rows = []
        for key in missing:
            if key == "copy":
                b = ceilings.copy_bandwidth(device_kind)  # type: ignore[arg-type]
                rows.append({"key": key, "family": "ceiling", "what": "copy", "dtype": None,
                             "flops_per_s": None, "bytes_per_s": b.bytes_per_s,
                             "samples_s": b.samples_s, "method": b.method})
            else:
                dtype = key.removeprefix("matmul:")
                c = ceilings.matmul_ceiling(dtype, device_kind)  # type: ignore[arg-type]
                rows.append({"key": key, "family": "ceiling", "what": "matmul", "dtype": dtype,
                             "flops_per_s": c.flops_per_s, "bytes_per_s": None,
                             "samples_s": c.samples_s, "method": c.method})
        self.append("ceiling", pd.DataFrame(rows))
        return missing

    def _check_part(self, part: Path, frame: pd.DataFrame) -> None:
        for column, want in (("schema_version", SCHEMA_VERSION), ("fingerprint", self.fingerprint_key)):
            if column not in frame:
                raise StoreError(f"{part} has no {column} column; it was not written by autotune "
                                 f"profile: delete it")
            found = set(frame[column].unique().tolist())
            if found != {want}:
                other = sorted(str(v) for v in found - {want})[0]
                what = "schema version" if column == "schema_version" else "fingerprint"
                raise StoreError(f"{part} holds {what} {other}, the store is {want}; figures of "
                                 f"two {what}s never mix: delete the part or use another store")
