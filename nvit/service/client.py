"""The httpx client the CLI and the agent use, and the local cache of remote tables.

Remote tables are named by URL: ``http://host:port/v1/luts/<sha256>``, or a query such as
``http://host:port/v1/luts?device=h100&precision=fp16`` that resolves to the newest matching table. A table
is downloaded once into ``$NVIT_CACHE_DIR/luts/<sha256>.parquet`` (default ``~/.cache/nvit``), its sha256
checked before it is used, so the pruning loop reads a local file and never touches the network. Tokens come
from ``$NVIT_TOKEN``. Every failure is one :class:`~nvit.service.errors.ServiceError` line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx

from nvit.errors import LutError
from nvit.fileio import atomic_path, file_sha256, nvit_cache_dir
from nvit.service.errors import ServiceError, error_line

TOKEN_ENV = "NVIT_TOKEN"
DEFAULT_TIMEOUT_S = 30.0
_UPLOAD_TIMEOUT_S = 600.0
_WAIT_POLL_S = 0.5
_SUBMIT_TRIES = 3
_CHUNK_BYTES = 1 << 20
_JOB_SHAPE: dict[str, type | tuple[type, ...]] = {"id": int, "state": str}
_LUT_PATH = re.compile(r"^(?P<prefix>.*?)/v1/luts(?:/(?P<sha>[0-9a-f]{64}))?/?$")


def is_url(value: str | os.PathLike[str]) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


class ServiceClient:
    """A connection to one service: ``base_url`` is ``http(s)://host:port`` (plus any path prefix)."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ServiceError(f"{base_url!r} is not an http(s) URL of an nvit service")
        self.base_url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing -----------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        """Send a request; a transport failure or an error status (not in ``ok``) is a ServiceError."""
        url = self.base_url + path
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc, method, path) from None
        if response.status_code >= 400 and response.status_code not in ok:
            raise _refusal(response, method, url)
        return response

    def _unreachable(self, exc: httpx.TransportError, method: str, path: str) -> ServiceError:
        if isinstance(exc, httpx.TimeoutException):
            return ServiceError(f"the nvit service at {self.base_url} did not answer {method} {path} in time")
        reason = str(exc).strip() or type(exc).__name__
        return ServiceError(f"cannot reach the nvit service at {self.base_url} ({reason}); is 'nvit serve' "
                            "running there?")

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return self.parse(self.request("GET", path, **kwargs), "GET", path)

    def post_json(self, path: str, body: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        response = self.request("POST", path, json=dict(body or {}), **kwargs)
        return self.parse(response, "POST", path) if response.content else None

    def parse(self, response: httpx.Response, method: str, path: str) -> Any:
        """The JSON of an answer; an answer that is not JSON (an HTML page: not an nvit service) is a
        ServiceError line."""
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type").split(";")[0]
            raise ServiceError(f"{self.base_url} is not an nvit service: {method} {path} answered {kind}, not JSON",
                               status=response.status_code) from None

    def expect(self, doc: Any, shape: Mapping[str, type | tuple[type, ...]], what: str) -> dict[str, Any]:
        """``doc`` as a JSON object with these keys of these types; anything else (JSON of another service)
        is a ServiceError line."""
        for key, kind in shape.items():
            if not isinstance(doc, dict) or not isinstance(doc.get(key), kind):
                raise ServiceError(f"{self.base_url} is not an nvit service (or another version): {what} has no "
                                   f"{key!r} of the expected type", status=200)
        return doc

    def upload(self, path: str, file: str | os.PathLike[str], *, params: Mapping[str, Any] | None = None) -> Any:
        """POST a file as the raw body (streamed, with its length)."""
        with open(file, "rb") as fh:
            response = self.request("POST", path, content=fh, params=params,
                                    headers={"Content-Type": "application/octet-stream"}, timeout=_UPLOAD_TIMEOUT_S)
        return self.expect(self.parse(response, "POST", path), {"sha256": str, "url": str}, f"the answer to {path}")

    def download(self, path: str, dest: str | os.PathLike[str], *, sha256: str | None = None) -> Path:
        """Stream ``path`` into ``dest`` atomically; with ``sha256`` the content must have that hash."""
        url = self.base_url + path
        digest = hashlib.sha256()
        with atomic_path(dest) as tmp:
            try:
                with self._http.stream("GET", path) as response, open(tmp, "wb") as fh:
                    if response.status_code >= 400:
                        response.read()
                        raise _refusal(response, "GET", url)
                    for chunk in response.iter_bytes(_CHUNK_BYTES):
                        digest.update(chunk)
                        fh.write(chunk)
            except httpx.TransportError as exc:
                raise self._unreachable(exc, "GET", path) from None
            if sha256 is not None and digest.hexdigest() != sha256:
                raise LutError(f"{url} sent content whose sha256 is {digest.hexdigest()}, not {sha256}; "
                               "nothing was saved")
        return Path(dest)

    def download_cached(self, path: str, dest: Path, sha256: str) -> Path:
        """``dest`` if it already holds the content with that sha256, else :meth:`download` it there."""
        if dest.is_file() and file_sha256(dest) == sha256:
            return dest
        return self.download(path, dest, sha256=sha256)

    # ---- jobs ---------------------------------------------------------------------------------------
    def submit_job(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Submit with a fresh Idempotency-Key, retried on transport failures: never runs twice."""
        key = uuid.uuid4().hex
        for attempt in range(_SUBMIT_TRIES):
            try:
                job = self.post_json("/v1/jobs", body, headers={"Idempotency-Key": key})
                return self.expect(job, _JOB_SHAPE, "a submitted job")
            except ServiceError as exc:
                if exc.status is not None or attempt == _SUBMIT_TRIES - 1:  # refused, or out of tries
                    raise
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def wait_job(self, job_id: int, *, on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Follow a job until it finishes; its final state, or a ServiceError if it failed or was cancelled."""
        while True:
            job = self.expect(self.get_json(f"/v1/jobs/{job_id}"), _JOB_SHAPE, f"job {job_id}")
            if on_update is not None:
                on_update(job)
            if job["state"] == "succeeded":
                self.expect(job, {"result": dict}, f"job {job_id}")
                return job
            if job["state"] in ("failed", "cancelled"):
                why = f": {job['error']}" if job.get("error") else ""
                raise ServiceError(f"job {job_id} on {self.base_url} {job['state']}{why}")
            time.sleep(_WAIT_POLL_S)

    def cancel_job(self, job_id: int) -> None:
        with contextlib.suppress(ServiceError):
            self.request("DELETE", f"/v1/jobs/{job_id}")


def _refusal(response: httpx.Response, method: str, url: str) -> ServiceError:
    """The one-line error of an error status, from the JSON body or else the text."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return ServiceError(error_line(response.status_code, body, f"{method} {url}"), status=response.status_code)


# ---- tables ---------------------------------------------------------------------------------------------
def split_lut_url(url: str) -> tuple[str, str | None, dict[str, str]]:
    """``(service base URL, sha256 or None, query)`` of a table URL; anything else is a ServiceError."""
    parts = urlsplit(url)
    match = _LUT_PATH.match(parts.path)
    if parts.scheme not in ("http", "https") or not parts.netloc or match is None:
        raise ServiceError(f"{url!r} is not a table URL: use http://HOST:PORT/v1/luts/<sha256> or "
                           "http://HOST:PORT/v1/luts?device=...&precision=... (the newest match)")
    base = urlunsplit((parts.scheme, parts.netloc, match.group("prefix"), "", ""))
    sha = match.group("sha")
    query = dict(parse_qsl(parts.query))
    if sha is None and not query:
        raise ServiceError(f"{url!r} names no table: add /<sha256> or a query such as ?device=...")
    return base, sha, query


def cached_lut_path(sha256: str) -> Path:
    return nvit_cache_dir() / "luts" / f"{sha256}.parquet"


def fetch_lut(url: str) -> Path:
    """The local copy of a remote table (downloaded once, sha256 checked)."""
    base, sha, query = split_lut_url(url)
    with ServiceClient(base) as client:
        if sha is None:
            found = client.get_json("/v1/luts", params={**query, "limit": 1})
            if not isinstance(found, list):
                raise ServiceError(f"{base} is not an nvit service (or another version): /v1/luts is not a list")
            if not found:
                what = "&".join(f"{k}={v}" for k, v in query.items())
                raise ServiceError(f"no table on {base} matches {what}")
            sha = client.expect(found[0], {"sha256": str}, "a table")["sha256"]
            if not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise ServiceError(f"{base} is not an nvit service: it names a table {sha[:80]!r}")
        return client.download_cached(f"/v1/luts/{sha}", cached_lut_path(sha), sha)


def resolve_lut(value: str | os.PathLike[str]) -> str:
    """A ``--lut`` value as a local path: table URLs are fetched into the cache, anything else is returned
    as it is."""
    return str(fetch_lut(value)) if is_url(value) else str(value)


def upload_lut(client: ServiceClient, path: str | os.PathLike[str]) -> str:
    """Store a local table on the service (content-addressed: uploading it again is harmless)."""
    return client.upload("/v1/luts", path)["sha256"]
