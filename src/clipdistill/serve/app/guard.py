"""The ASGI guard in front of every route: body cap and per-route metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from clipdistill.serve.app.limits import MAX_BODY_BYTES, MAX_IMAGE_BYTES
from clipdistill.serve.app.metrics import Metrics


class ServiceMiddleware:
    """Caps the request body (before and while reading it) and records per-route metrics.

    A pure ASGI middleware (no per-request task like ``BaseHTTPMiddleware``); the route label is
    the matched path template, so ``/images/{image_id}`` is one series, not one per id.
    """

    def __init__(self, app: Any, metrics: Metrics, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body

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
            length = self._content_length(scope)
            if length is not None and length > self.max_body:
                await _send_json(send_status, 413, self._too_large(length))
                return
            received = 0

            async def capped_receive() -> Any:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise HTTPException(413, self._too_large(received, at_least=True))
                return message

            await self.app(scope, capped_receive, send_status)
        except _BadRequest as error:
            await _send_json(send_status, 400, str(error))
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope.get("method", ""), label, str(status["code"])).inc()
            self.metrics.request_seconds.labels(label).observe(time.perf_counter() - started)

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
