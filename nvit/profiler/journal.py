"""The sweep journal: what a profiling run has measured so far, append-only and fsynced, so a killed run
resumes where it stopped and two runs never write the same table."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvit.errors import LutError

logger = logging.getLogger(__name__)

JOURNAL_KIND = "nvit.sweep-journal"
JOURNAL_SCHEMA_VERSION = 1
JOURNAL_SUFFIX = ".journal.jsonl"


def journal_path(out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    return out.with_name(out.name + JOURNAL_SUFFIX)



class Journal:
    """Append-only JSON lines: a header line (what the sweep measures and how), then one record per line.

    The open journal holds an exclusive lock (``flock``), so two runs never write the same table.
    """

    def __init__(self, path: Path, fd: int, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
        self.path, self._fd = path, fd
        self.header = header
        self.records = records

    @classmethod
    def open(cls, path: Path, header: dict[str, Any], *, fresh: bool = False) -> Journal:
        """Resume ``path`` if it holds records (refusing another header), else start it with ``header``;
        ``fresh`` discards what it holds."""
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LutError(f"another profiling run is writing {path}; wait for it or choose another --out"
                               ) from None
            if not path.exists() or os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise LutError(f"another profiling run finished {path} meanwhile; rerun to see its table")
            if fresh:
                os.ftruncate(fd, 0)
            lines = _read_lines(path) if os.fstat(fd).st_size else []
            if not lines:
                journal = cls(path, fd, header, [])
                journal._write_line(header)
                return journal
            found = lines[0]
            if found.get("kind") != JOURNAL_KIND or found.get("schema_version") != JOURNAL_SCHEMA_VERSION:
                raise LutError(f"{path} is not a sweep journal this nvit can resume; delete it or use --no-resume")
            diff = sorted(k for k in set(found) | set(header) if k != "created_at" and found.get(k) != header.get(k))
            if diff:
                raise LutError(f"sweep journal {path} was made with other {', '.join(diff)}; "
                               "rerun with the same settings, or use --no-resume to start over")
            return cls(path, fd, found, lines[1:])
        except BaseException:
            os.close(fd)
            raise

    def append(self, record: dict[str, Any]) -> None:
        self._write_line(record)
        self.records.append(record)

    def _write_line(self, obj: Mapping[str, Any]) -> None:
        os.write(self._fd, (json.dumps(obj, sort_keys=True) + "\n").encode())
        os.fsync(self._fd)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == kind]

    def close(self, *, remove: bool = False) -> None:
        """Release the lock; with ``remove`` delete the journal first (its table is written)."""
        if self._fd < 0:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """Parse a journal; a torn last line (the write a kill interrupted) is cut off the file."""
    raw = path.read_bytes()
    parts = raw.split(b"\n")
    out: list[dict[str, Any]] = []
    good_bytes = 0
    for i, line in enumerate(parts):
        last = i == len(parts) - 1
        if not line.strip():
            if not last:
                good_bytes += len(line) + 1
            continue
        try:
            obj = json.loads(line)
            if last:
                raise ValueError("no newline: torn write")
        except ValueError:
            if last or all(not p.strip() for p in parts[i + 1:]):
                logger.warning("sweep journal %s: dropping a torn last line", path)
                with open(path, "r+b") as fh:
                    fh.truncate(good_bytes)
                    os.fsync(fh.fileno())
                break
            raise LutError(f"sweep journal {path} is corrupt at line {i + 1}; delete it or use --no-resume") from None
        out.append(obj)
        good_bytes += len(line) + 1
    return out
