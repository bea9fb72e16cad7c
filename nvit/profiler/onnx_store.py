"""A content-addressed store of ONNX exports, shared by every profiling run on this machine.

Exporting a block costs as much as timing it; the same block (same widths, same seeded weights, same
exporter) exports to the same file every time, so a second table, a second pass, a re-check of a table
(``nvit lut check``) or a re-run of the demo need not export it again. The key is a SHA-256 over what
decides the file's bytes: the module's structure (``repr``), every parameter and buffer (name, dtype,
shape, bytes), the source of the classes it is made of, the input shape, the precision, the opset and the
torch / onnx / onnxscript versions. Entries are written atomically; the least recently used ones are
removed when the store grows past its size limit.

Location: ``onnx/`` in nvit's cache folder (:func:`nvit.fileio.nvit_cache_dir`: ``$NVIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/nvit``, else ``~/.cache/nvit``); ``NVIT_ONNX_CACHE=0`` turns it off, ``NVIT_ONNX_CACHE_MAX_GB``
sets the limit (default 4).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from nvit.fileio import atomic_path, nvit_cache_dir

logger = logging.getLogger(__name__)

ENV_SWITCH = "NVIT_ONNX_CACHE"
ENV_MAX_GB = "NVIT_ONNX_CACHE_MAX_GB"
DEFAULT_MAX_GB = 4.0
STORE_VERSION = 1  # bump when the key's recipe changes
_SUFFIX = ".onnx"
_EVICT_EVERY = 16  # puts between size checks


def default_store() -> OnnxStore | None:
    """The machine's store, or ``None`` when ``NVIT_ONNX_CACHE`` is ``0``/``off``/``false``."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in {"0", "off", "false", "no"}:
        return None
    root = nvit_cache_dir() / "onnx"
    try:
        max_gb = float(os.environ.get(ENV_MAX_GB, DEFAULT_MAX_GB))
    except ValueError:
        logger.warning("%s is not a number; using %.0f GB", ENV_MAX_GB, DEFAULT_MAX_GB)
        max_gb = DEFAULT_MAX_GB
    return OnnxStore(root, max_bytes=int(max_gb * 2**30))


@functools.lru_cache(maxsize=1)
def _exporter_versions() -> str:
    import torch

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return f"torch={torch.__version__};onnx={version('onnx')};onnxscript={version('onnxscript')}"


@functools.lru_cache(maxsize=64)
def _source_digest(module_name: str) -> str:
    """The SHA-256 of a Python module's source (``-`` when it has none)."""
    mod = sys.modules.get(module_name)
    try:
        source = inspect.getsource(mod) if mod is not None else "-"
    except (OSError, TypeError):
        source = "-"
    return hashlib.sha256(source.encode()).hexdigest()


def content_key(module: Any, input_shape: tuple[int, ...], precision: str, opset: int) -> str:
    """The store key of ``module`` exported for ``input_shape`` at ``precision`` and ``opset``."""
    h = hashlib.sha256()
    h.update(f"v{STORE_VERSION};{_exporter_versions()};opset={opset};{precision};{tuple(input_shape)}\n".encode())
    h.update(repr(module).encode())
    for name in sorted({type(m).__module__ for m in module.modules()}):
        h.update(f"{name}:{_source_digest(name)};".encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(dtype=_byte_dtype()).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


class OnnxStore:
    """Files named by their content key under ``root`` (see the module doc)."""

    def __init__(self, root: str | os.PathLike[str], *, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._puts = 0

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{_SUFFIX}"

    def get(self, key: str) -> Path | None:
        """The stored file for ``key`` (marked as recently used), or ``None``."""
        path = self._path(key)
        try:
            os.utime(path)
        except OSError:
            return None
        return path

    def put(self, key: str, source: Path) -> Path:
        """Copy ``source`` into the store (atomically) and return the stored path; the source is kept.
        A store that cannot be written (full disk, read-only) is skipped with a warning."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                shutil.copyfile(source, tmp)
            self._puts += 1
            if self._puts % _EVICT_EVERY == 1:
                self.evict()
        except OSError as exc:
            logger.warning("ONNX store %s not written (%s); exports are not reused", self.root, exc.strerror)
            return source
        return path

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob(f"*/*{_SUFFIX}"))

    def evict(self) -> int:
        """Remove the least recently used entries until the store fits ``max_bytes``; return how many."""
        entries = []
        for p in self.root.glob(f"*/*{_SUFFIX}"):
            try:
                st = p.stat()
            except FileNotFoundError:  # another process evicted it
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        removed = 0
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
            removed += 1
        if removed:
            logger.info("ONNX store %s: removed %d least recently used export(s)", self.root, removed)
        return removed
