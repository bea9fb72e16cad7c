"""ASGI middleware in front of every route: body limits, and the rules that keep web pages out.

:class:`BodyLimit` refuses a body over its limit with 413, whether it declares its length or arrives chunked:
a JSON body is read (up to its limit) before the route sees it; an upload streams and is cut off at its limit.

:class:`BrowserGuard` keeps a browser from being used against the service. A web page can make a browser send
"simple" cross-site requests (no CORS preflight: ``text/plain``, form or multipart bodies, or a bodiless
POST), and a DNS-rebinding page can make a browser send requests to 127.0.0.1 under the page's own host
name. So: on a loopback address only the host names of this machine are answered (``Host``); a write
(POST, PUT, PATCH, DELETE) from another site (``Sec-Fetch-Site``, ``Origin``) is refused; a JSON route
accepts only ``application/json`` and an upload only a binary type, never a type a page may send without
a preflight. nvit's own clients (httpx) send no ``Origin`` and the right types, and are never refused.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from nvit.service.auth import is_loopback
from nvit.service.config import ServiceSettings
from nvit.service.errors import PROBLEM_MEDIA_TYPE, problem

UPLOAD_PATHS = ("/v1/luts", "/v1/models")  # (and a job's table) bodies that are files, limited per route
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
UPLOAD_TYPES = frozenset({"application/octet-stream", "application/vnd.apache.parquet", "application/x-parquet",
                          "application/onnx"})
SAME_SITE_FETCHES = frozenset({"same-origin", "none"})


def is_upload(path: str) -> bool:
    return path in UPLOAD_PATHS or (path.startswith("/v1/jobs/") and path.endswith("/table"))


async def send_problem(send: Any, status: int, title: str, detail: str) -> None:
    import json

    body = json.dumps(problem(status, title, detail)).encode()
    headers = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _drain(receive: Any) -> None:
    """Read what is left of a request body (bounded by the caller) so the client sees the answer."""
    more = True
    while more:
        message = await receive()
        more = message.get("type") == "http.request" and message.get("more_body", False)


class BodyLimit:
    """Refuse a body over its limit, by its Content-Length or while it arrives (chunked)."""

    def __init__(self, app: Any, settings: ServiceSettings) -> None:
        self.app, self.settings = app, settings

    def limit(self, path: str) -> int:
        if is_upload(path):
            return max(self.settings.max_model_bytes, self.settings.max_table_bytes)  # each route checks its own
        return self.settings.max_json_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, limit = scope["path"], self.limit(scope["path"])
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_problem(send, 413, "payload too large", f"a body of {int(declared)} bytes is over the limit "
                               f"of {limit} bytes for {path}")
            return
        if is_upload(path):
            await self.app(scope, self._streaming(receive, limit), send)
            return
        chunks: list[bytes] = []
        seen = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message]), send)
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                await send_problem(send, 413, "payload too large", f"the body is over the limit of {limit} bytes "
                                   f"for {path}")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                                      then=receive), send)

    @staticmethod
    def _streaming(receive: Any, limit: int) -> Any:
        from nvit.service.errors import too_large

        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(f"the body is over the limit of {limit} bytes")
            return message

        return limited


def _replay(messages: list[dict[str, Any]], then: Any = None) -> Any:
    pending = list(messages)

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


def _host_name(value: str) -> str:
    """The host of a ``Host`` header or an origin's netloc, without port or brackets, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_this_machine(host: str, listen_host: str) -> bool:
    if host in ("localhost", listen_host.strip("[]").lower()) or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BrowserGuard:
    """Refuse unknown host names on loopback (DNS rebinding), cross-site writes, and bodies of the types a
    web page may send without a preflight."""

    def __init__(self, app: Any, settings: ServiceSettings) -> None:
        self.app = app
        self.listen_host = settings.listen_host
        self.loopback = is_loopback(settings.listen_host)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            status, title, detail = refusal
            await send_problem(send, status, title, detail)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: dict[str, Any]) -> tuple[int, str, str] | None:
        headers = Headers(scope=scope)
        host = _host_name(headers.get("host", ""))
        if self.loopback and not _is_this_machine(host, self.listen_host):
            return (403, "forbidden", f"this server listens on {self.listen_host} and answers only to this "
                    f"machine's names, not Host {headers.get('host', '')!r}")
        if scope["method"] in SAFE_METHODS:
            return None
        fetch_site = headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site.lower() not in SAME_SITE_FETCHES:
            return 403, "forbidden", f"a {fetch_site} write from a web page is refused"
        origin = headers.get("origin")
        if origin is not None:
            origin_host = _host_name(urlsplit(origin).netloc) if origin.lower() != "null" else ""
            same = _is_this_machine(origin_host, self.listen_host) if self.loopback else origin_host == host
            if not origin_host or not same:
                return 403, "forbidden", f"a write from the web origin {origin[:100]!r} is refused"
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        if is_upload(scope["path"]):
            if media and media not in UPLOAD_TYPES:
                return (415, "unsupported media type", f"an upload is sent as application/octet-stream, "
                        f"not {media}")
        elif has_body and not (media == "application/json" or media.endswith("+json")):
            return 415, "unsupported media type", f"this route takes application/json, not {media or 'no type'}"
        return None
