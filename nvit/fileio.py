"""Atomic file writes (a reader never sees a half-written artifact, whatever kills the writer), file hashes
and the cache folder."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nvit.errors import OutputError

CACHE_ENV = "NVIT_CACHE_DIR"
_HASH_CHUNK_BYTES = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def nvit_cache_dir() -> Path:
    """Where nvit keeps caches: ``$NVIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/nvit`` (~/.cache/nvit)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nvit"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; a file cannot be written there")
    make_folder(path.parent)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _first_file_on(path: Path) -> Path | None:
    """``path`` or the nearest of its parents that exists and is not a folder (what blocks ``mkdir -p``)."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def output_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Check, before any work, that ``path`` can be (or already is) a folder; one clear error otherwise."""
    path = Path(path)
    blocker = _first_file_on(path)
    if blocker is not None:
        where = "" if blocker == path else f" (its parent {blocker} is a file)"
        raise OutputError(f"{option} {path} must be a folder, but a file is in the way{where}; "
                          "choose another path or remove the file")
    return path


def output_file(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Check, before any work, that ``path`` can be written as a file (not a folder, parents not files)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name")
    output_folder(path.parent, f"the folder of {option}")
    return path


def make_folder(path: Path) -> None:
    """``mkdir -p`` that reports a file in the way as one clear error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        output_folder(path, "folder")
        raise
