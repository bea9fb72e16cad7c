"""Content-addressed files under the state directory: ONNX models and latency tables, named by sha256.

An upload is streamed into a temporary file while its sha256 is computed and its size counted; it is
refused (413) as soon as it passes the limit, before the rest is read, and the temporary file is removed.
Only an upload that passed inspection is renamed into place, so ``blobs/`` holds nothing unchecked and a
reader never sees a partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from nvit.service.errors import bad_request, too_large

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def check_sha256(value: str) -> str:
    if not SHA256_RE.match(value):
        raise bad_request(f"{value!r} is not a sha256 (64 lower-case hex digits)")
    return value


@dataclass(frozen=True)
class ReceivedBlob:
    """An upload in its temporary file, not yet accepted."""

    path: Path
    sha256: str
    size_bytes: int


class BlobStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        for stale in self._tmp.iterdir():  # uploads cut short by a previous crash
            with contextlib.suppress(OSError):
                stale.unlink()

    def path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self._blobs / sha256[:2] / sha256

    def temp_path(self, suffix: str = "") -> Path:
        fd, name = tempfile.mkstemp(dir=self._tmp, suffix=suffix)
        os.close(fd)
        return Path(name)

    async def receive(self, chunks: AsyncIterator[bytes], *, limit_bytes: int, declared_bytes: int | None,
                      what: str, suffix: str = "") -> ReceivedBlob:
        """Stream an upload to a temporary file, refusing it once it passes ``limit_bytes``."""
        if declared_bytes is not None and declared_bytes > limit_bytes:
            raise too_large(f"{what} of {declared_bytes} bytes is over the limit of {limit_bytes} bytes")
        path = self.temp_path(suffix)
        digest = hashlib.sha256()
        size = 0
        try:
            with open(path, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit_bytes:
                        raise too_large(f"{what} is over the limit of {limit_bytes} bytes")
                    digest.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if size == 0:
            path.unlink(missing_ok=True)
            raise bad_request(f"the {what} is empty")
        return ReceivedBlob(path, digest.hexdigest(), size)

    def accept(self, received: ReceivedBlob) -> Path:
        """Move an inspected upload into place (a blob already stored stays as it is)."""
        target = self.path(received.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            received.path.unlink(missing_ok=True)
        else:
            os.replace(received.path, target)
        return target

    @staticmethod
    def discard(received: ReceivedBlob) -> None:
        received.path.unlink(missing_ok=True)
