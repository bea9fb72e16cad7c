"""Errors of the service and how they cross the wire: RFC 9457 problem details, mapped back to one line.

The server answers every refusal with ``application/problem+json`` (``type``, ``title``, ``status``,
``detail``); the client turns a problem into a :class:`ServiceError` whose message is the one line the CLI
prints, naming the server and the HTTP status.
"""

from __future__ import annotations

from typing import Any

from nvit.errors import NvitError

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://nvit.dev/problems/"


class ServiceError(NvitError):
    """The service is unreachable, or refused a request (the message says why; ``status`` is the HTTP
    status of a refusal, ``None`` when no answer came)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiError(Exception):
    """Raised inside the server: becomes a problem response with this status, title and detail."""

    def __init__(self, status: int, title: str, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.headers = headers or {}


def problem(status: int, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    slug = title.lower().replace(" ", "-")
    return {"type": PROBLEM_TYPE_BASE + slug, "title": title, "status": status, "detail": detail, **extra}


def bad_request(detail: str) -> ApiError:
    return ApiError(400, "bad request", detail)


def unprocessable(detail: str) -> ApiError:
    return ApiError(422, "invalid input", detail)


def forbidden(detail: str) -> ApiError:
    return ApiError(403, "forbidden", detail)


def not_found(detail: str) -> ApiError:
    return ApiError(404, "not found", detail)


def conflict(detail: str) -> ApiError:
    return ApiError(409, "conflict", detail)


def too_large(detail: str) -> ApiError:
    return ApiError(413, "payload too large", detail)


def error_line(status: int, body: Any, url: str) -> str:
    """The one-line message for an error response (a problem document, or anything else)."""
    detail = ""
    if isinstance(body, dict):
        detail = str(body.get("detail") or body.get("title") or "")
    elif isinstance(body, str):
        detail = body.strip().splitlines()[0] if body.strip() else ""
    detail = detail or "no detail given"
    return f"the nvit service refused {url}: {detail} (HTTP {status})"
