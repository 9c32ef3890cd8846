"""The ASGI gate in front of every route: the API key and the body size are checked from the
headers, before any body byte is read.

A body must declare its Content-Length (411 otherwise, 400 when it is not a number), so an
oversized upload is refused from its headers (413) and never buffered. With an API key, every
route but the open ones needs `Authorization: Bearer <key>` (the scheme in any case, as HTTP
says), and the key is compared by hash in constant time.
"""

from __future__ import annotations

import hashlib
import hmac

from pixfleet.config.serving import LimitsConfig
from pixfleet.serving.errors import ApiError

# Reachable without the API key; the playground page (/) asks for it and sends it with its calls.
OPEN_PATHS = {"/", "/healthz", "/docs", "/openapi.json"}


def bearer_token(authorization: bytes) -> bytes | None:
    """The credentials of an `Authorization: Bearer <token>` header, or None for another scheme."""
    scheme, _, credentials = authorization.strip().partition(b" ")
    return credentials.strip() if scheme.lower() == b"bearer" and credentials.strip() else None


class RequestGate:
    """ASGI middleware; the app's `state` holds `limits` and `api_key_sha256` (None: no key)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        error = self.check(scope, state.limits, state.api_key_sha256)
        if error is None:
            return await self.app(scope, receive, send)
        await error.response()(scope, receive, send)

    @staticmethod
    def check(scope, limits: LimitsConfig, api_key_sha256: str | None) -> ApiError | None:
        headers = dict(scope["headers"])
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if api_key_sha256 and path not in OPEN_PATHS:
            token = bearer_token(headers.get(b"authorization", b""))
            presented = hashlib.sha256(token or b"").hexdigest()
            if token is None or not hmac.compare_digest(presented, api_key_sha256):
                message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
                return ApiError(401, message, headers={"www-authenticate": "Bearer"})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            declared = headers.get(b"content-length")
            if declared is None:
                return ApiError(411, "the request body needs a Content-Length header")
            if not declared.strip().isdigit():
                return ApiError(400, "Content-Length: not a number of bytes", "Content-Length")
            if int(declared) > limits.max_body_bytes:
                return ApiError(413, f"body of {int(declared)} bytes exceeds max_body_bytes={limits.max_body_bytes}")
        return None
