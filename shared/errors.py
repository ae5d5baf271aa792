"""Errors that carry a stable code and an HTTP status, so every layer reports them the same way."""

from __future__ import annotations


class ClusterlensError(Exception):
    """An error meant for the user: a stable ``code``, a readable message, an HTTP status."""

    code = "error"
    status = 400

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class BadRequest(ClusterlensError):
    code = "bad_request"
    status = 400


class InvalidImage(ClusterlensError):
    """The bytes claim to be an image but cannot be decoded (truncated, corrupt, too large)."""

    code = "invalid_image"
    status = 400


class UnsupportedMediaType(ClusterlensError):
    code = "unsupported_media_type"
    status = 415


class PayloadTooLarge(ClusterlensError):
    code = "payload_too_large"
    status = 413


class Unauthorized(ClusterlensError):
    """No valid credential for the level the endpoint needs."""

    code = "unauthorized"
    status = 401


class Forbidden(ClusterlensError):
    """A valid credential, but not for this level (or the level is closed)."""

    code = "forbidden"
    status = 403


class NotFound(ClusterlensError):
    code = "not_found"
    status = 404


class NotReady(ClusterlensError):
    """Something the request needs has not been built yet (model, index)."""

    code = "not_ready"
    status = 503


class QualityGate(ClusterlensError):
    """A build that does not meet its quality target and so is not published."""

    code = "quality_gate"
    status = 409


class VersionMismatch(ClusterlensError):
    code = "version_mismatch"
    status = 409


class Conflict(ClusterlensError):
    """The request is valid but the state it needs is not there (no label set yet, ...)."""

    code = "conflict"
    status = 409
