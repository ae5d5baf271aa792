"""Who may call what. Read endpoints (search, images, map, reports) and write/admin endpoints (upload,
labels, delete, jobs, rollback) have separate levels.

Two ways to prove a level, either enough:

- An API key in the ``X-API-Key`` header: ``CLUSTERLENS_API_KEY`` opens write (and read),
  ``CLUSTERLENS_READ_KEY`` read only. Compared in constant time.
- In Azure with App Service authentication (Microsoft Entra ID) in front, when
  ``CLUSTERLENS_AUTH_PLATFORM`` is on: the ``X-MS-CLIENT-PRINCIPAL`` header the platform injects
  (and strips from incoming requests) names the caller's app roles; ``clusterlens.write`` may write,
  any signed-in caller may read.

Defaults: reads are open (no read key), writes are closed until a write key (or the platform) is set.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from collections.abc import Mapping
from typing import Literal

from shared.errors import Forbidden, Unauthorized
from shared.settings import Settings

log = logging.getLogger(__name__)

Level = Literal["read", "write"]
API_KEY_HEADER = "X-API-Key"  # a header name  # pragma: allowlist secret
PRINCIPAL_HEADER = "X-MS-CLIENT-PRINCIPAL"
WRITE_ROLE = "clusterlens.write"
READ_ROLE = "clusterlens.read"
ROLE_CLAIMS = ("roles", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role")
MAX_KEY_CHARS = 256


def _matches(given: str, secret: str | None) -> bool:
    """Constant-time comparison of a presented key with a configured one."""
    if secret is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), secret.encode("utf-8"))


def platform_roles(headers: Mapping[str, str]) -> set[str] | None:
    """The app roles of the caller App Service authentication signed in, or None if none did.

    The platform sends the principal as base64 JSON
    ``{"auth_typ": ..., "claims": [{"typ": ..., "val": ...}, ...], "name_typ": ..., "role_typ": ...}``.
    A header that cannot be read counts as no principal.
    """
    raw = headers.get(PRINCIPAL_HEADER)
    if not raw or len(raw) > 64 * 1024:
        return None
    try:
        principal = json.loads(base64.b64decode(raw, validate=True))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    claims = principal.get("claims") if isinstance(principal, dict) else None
    if not isinstance(claims, list):
        return None
    role_types = {*ROLE_CLAIMS, principal.get("role_typ")}  # the principal names its own role claim type
    return {
        c["val"] for c in claims if isinstance(c, dict) and c.get("typ") in role_types and isinstance(c.get("val"), str)
    }


def check_access(settings: Settings, headers: Mapping[str, str], level: Level, cookie_key: str | None = None) -> str:
    """Check that a request may use an endpoint of ``level``; returns how it was let in.

    Args:
        settings: the keys and whether the platform's authentication is trusted.
        headers: the request headers (case-insensitive mapping).
        level: ``read`` or ``write``.
        cookie_key: the key from the page's ``clusterlens-key`` cookie, which ``<img>`` requests carry;
            taken for reading only (a cookie rides along on any request, so it never opens writes).

    Returns:
        ``open``, ``write_key``, ``read_key``, ``cookie`` or ``platform``.

    Raises:
        Unauthorized: no credential, or a key that matches none (401).
        Forbidden: a read credential on a write endpoint, or writes closed by configuration (403).
    """
    write_key = settings.api_key.get_secret_value() if settings.api_key else None
    read_key = settings.read_key.get_secret_value() if settings.read_key else None
    given = headers.get(API_KEY_HEADER)
    if given is None and level == "read" and cookie_key:  # a stale cookie is ignored, never refused
        cookie_key = cookie_key[:MAX_KEY_CHARS]
        if _matches(cookie_key, write_key) or _matches(cookie_key, read_key):
            return "cookie"
    if given is not None:
        given = given[:MAX_KEY_CHARS]
        if _matches(given, write_key):
            return "write_key"
        if _matches(given, read_key):
            if level == "read":
                return "read_key"
            raise Forbidden("the read key cannot change anything: this endpoint needs the write key")
        raise Unauthorized(f"the {API_KEY_HEADER} header holds no valid key", code="invalid_api_key")
    roles = platform_roles(headers) if settings.auth_platform else None
    if roles is not None:
        if level == "read" or WRITE_ROLE in roles:
            return "platform"
        raise Forbidden(f"this endpoint needs the app role {WRITE_ROLE}")
    if level == "read" and read_key is None and not settings.auth_platform:
        return "open"
    if level == "write" and write_key is None and not settings.auth_platform:
        raise Forbidden(
            "write endpoints are closed: the server has no write key (set CLUSTERLENS_API_KEY and send it in "
            f"the {API_KEY_HEADER} header)",
            code="writes_closed",
        )
    need = "write" if level == "write" else "read"
    raise Unauthorized(f"this endpoint needs the {need} key in the {API_KEY_HEADER} header", code="missing_api_key")
