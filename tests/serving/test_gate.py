"""The ASGI gate alone: API key and body size from the headers, before any body byte."""

from __future__ import annotations

import hashlib

import pytest

from pixfleet.config.serving import LimitsConfig
from pixfleet.serving.gate import RequestGate, bearer_token

KEY_SHA256 = hashlib.sha256(b"secret").hexdigest()


def scope(method: str = "POST", path: str = "/v1/generate", **headers: str) -> dict:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    }


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"content_length": "12"}, None),
        ({}, 411),
        ({"content_length": "12abc"}, 400),
        ({"content_length": "-5"}, 400),
        ({"content_length": "1_000"}, 400),  # int() would take it
        ({"content_length": str(2**20 + 1)}, 413),
    ],
)
def test_the_body_size_is_checked_from_content_length(headers, status):
    error = RequestGate.check(scope(**headers), LimitsConfig(max_body_bytes=2**20), None)
    assert (error.status if error else None) == status
    if error:
        assert set(error.body()) == {"error"} and error.body()["error"]["message"]


@pytest.mark.parametrize(
    ("authorization", "accepted"),
    [
        ("Bearer secret", True),
        ("bearer secret", True),
        ("BEARER   secret  ", True),
        ("secret", False),
        ("Basic secret", False),
        ("Bearer", False),
        ("Bearer wrong", False),
        ("", False),
    ],
)
def test_the_api_key_needs_the_bearer_scheme_in_any_case(authorization, accepted):
    request = scope("GET", "/v1/models", authorization=authorization)
    error = RequestGate.check(request, LimitsConfig(), KEY_SHA256)
    assert (error is None) == accepted
    assert RequestGate.check(scope("GET", "/healthz"), LimitsConfig(), KEY_SHA256) is None


def test_bearer_token_parsing():
    assert bearer_token(b"Bearer abc") == b"abc"
    assert bearer_token(b"abc") is None
