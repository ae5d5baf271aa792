"""The write/admin key of every test app (write endpoints are closed without one); clients send AUTH."""

API_KEY = "test-write-key-4f1c2a9d"  # pragma: allowlist secret (a test value)
AUTH = {"X-API-Key": API_KEY}
