"""The ASGI guard in front of every route: Host check, body cap and deadline, per-route metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
from fastapi import HTTPException
from fastapi.responses import JSONResponse

from clipdistill.serve.app.limits import BODY_TIMEOUT_SECONDS, HTTP_METHODS, MAX_BODY_BYTES, MAX_IMAGE_BYTES
from clipdistill.serve.app.metrics import Metrics


class ServiceMiddleware:
    """In front of every route: the Host check, the body cap (before and while reading it), the
    body deadline, and per-route metrics.

    A pure ASGI middleware (no per-request task like ``BaseHTTPMiddleware``); the route label is
    the matched path template, so ``/images/{image_id}`` is one series, not one per id, and the
    method label is one of :data:`HTTP_METHODS` or ``other``.

    ``allowed_hosts``: the names a request's ``Host`` header may carry (``None`` or ``"*"``:
    any). A browser page on another site can point its own name at 127.0.0.1 (DNS rebinding)
    and then read this service as "same origin"; its requests still carry that site's name in
    ``Host``, so refusing unknown names closes the hole.
    """

    def __init__(
        self,
        app: Any,
        metrics: Metrics,
        max_body: int = MAX_BODY_BYTES,
        allowed_hosts: Sequence[str] | None = None,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        hosts = None if allowed_hosts is None or "*" in allowed_hosts else allowed_hosts
        self.allowed_hosts = None if hosts is None else frozenset(h.lower().strip("[]") for h in hosts)
        self.body_timeout = body_timeout

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            host = self._host(scope)
            if self.allowed_hosts is not None and host not in self.allowed_hosts:
                await _send_json(send_status, 400, self._unknown_host(host))
                return
            length = self._content_length(scope)
            if length is not None and length > self.max_body:
                await _send_json(send_status, 413, self._too_large(length))
                return
            received = 0
            body_done = False
            deadline = started + self.body_timeout

            async def capped_receive() -> Any:
                nonlocal received, body_done
                if body_done:  # later reads only listen for a disconnect: no deadline
                    return await receive()
                try:
                    with anyio.fail_after(max(0.0, deadline - time.perf_counter())):
                        message = await receive()
                except TimeoutError:
                    raise HTTPException(
                        408, f"the request body did not arrive within {self.body_timeout:g} seconds"
                    ) from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise HTTPException(413, self._too_large(received, at_least=True))
                    body_done = not message.get("more_body", False)
                return message

            await self.app(scope, capped_receive, send_status)
        except _BadRequest as error:
            await _send_json(send_status, 400, str(error))
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            method = method if method in HTTP_METHODS else "other"
            self.metrics.requests.labels(method, label, str(status["code"])).inc()
            self.metrics.request_seconds.labels(label).observe(time.perf_counter() - started)

    @staticmethod
    def _host(scope: dict[str, Any]) -> str:
        """The Host header's name, lower case, without the port or IPv6 brackets."""
        for key, value in scope.get("headers", []):
            if key == b"host":
                text = value.decode("latin-1").strip().lower()
                if text.startswith("["):
                    return text[1:].partition("]")[0]
                name, sep, port = text.rpartition(":")
                return name if sep and port.isdigit() else text
        return ""

    def _unknown_host(self, host: str) -> str:
        allowed = ", ".join(sorted(self.allowed_hosts or ()))
        return (
            f"Host {host[:80]!r} is not one this server answers to (allowed: {allowed}); "
            "add it with clipdistill serve --allow-host NAME"
        )

    def _too_large(self, size: int, at_least: bool = False) -> str:
        return (
            f"request body is {'over ' if at_least else ''}{size} bytes; the limit is {self.max_body} bytes "
            f"(images are limited to {MAX_IMAGE_BYTES // (1024 * 1024)} MB)"
        )

    @staticmethod
    def _content_length(scope: dict[str, Any]) -> int | None:
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    raise _BadRequest(f"Content-Length header {value[:40]!r} is not a number") from None
        return None


class _BadRequest(ValueError):
    pass


async def _send_json(send: Any, status: int, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=status)
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> dict[str, Any]:  # pragma: no cover - JSONResponse never reads the request
    return {"type": "http.disconnect"}
