"""Browser-facing protections for the HTTP app: security headers on every response, a strict
Content-Security-Policy for the page (its inline script and style allowed by hash, nothing else).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# On every response: no MIME sniffing, no framing, no referrer leaking ids, no powerful features.
BASE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# Anything that is not the page or the API docs (JSON, images, report files) may load nothing.
LOCKED_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'; sandbox"
HSTS = "max-age=31536000; includeSubDomains"


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def page_csp(html: str) -> str:
    """The page's Content-Security-Policy: its own inline ``<script>`` and ``<style>`` blocks (by hash),
    images from the API (and the thumbnails it makes as data/blob URLs), requests to the API only."""
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, flags=re.S)
    return "; ".join(
        [
            "default-src 'none'",
            "script-src " + " ".join(_sha256(s) for s in scripts),
            "style-src " + " ".join(_sha256(s) for s in styles),
            "img-src 'self' data: blob:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


class SecurityHeaders:
    """ASGI middleware: adds :data:`BASE_HEADERS` to every response, a locked CSP to every response
    that sets none of its own (the page sets its own; the API docs page is left to load its assets),
    and HSTS when the request came over HTTPS (directly or through the platform's front end)."""

    def __init__(self, app: ASGIApp, docs_paths: tuple[str, ...] = ()):
        self.app = app
        self.docs_paths = docs_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        https = scope.get("scheme") == "https" or any(
            k == b"x-forwarded-proto" and v.split(b",")[0].strip() == b"https" for k, v in scope.get("headers", [])
        )
        docs = scope.get("path", "") in self.docs_paths

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                extra = dict(BASE_HEADERS)
                if not docs:
                    extra["Content-Security-Policy"] = LOCKED_CSP
                if https:
                    extra["Strict-Transport-Security"] = HSTS
                headers += [
                    (k.lower().encode(), v.encode()) for k, v in extra.items() if k.lower().encode() not in present
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
