"""Every error response in one shape, OpenAI's: `{"error": {"message", "type", "param", "code"}}`.

Handlers cover pixfleet's own errors, request validation, Starlette's HTTP errors (unknown
route 404, wrong method 405, a malformed or oversized multipart form 400) and, as a last
resort, anything unexpected (500, with the details in the server log, never in the response).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pixfleet.config.loading import describe_errors

logger = logging.getLogger("ray.serve")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """An HTTP error with a message naming the field (`param`) at fault, and headers such as
    Retry-After."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        error_type = ERROR_TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": None}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_validation_errors(errors: list[dict[str, Any]]) -> ApiError:
    """pydantic's errors as one ApiError: 400 for a body that is not JSON, else 422 naming the field."""
    if errors[0]["type"] == "json_invalid":  # loc is ("body", offset): the body as a whole is bad
        return ApiError(400, f"body: not valid JSON ({errors[0]['msg']})", "body")
    located = [{**e, "loc": tuple(part for part in e["loc"] if part != "body")} for e in errors]
    field, message = describe_errors(located)[0]
    return ApiError(422, f"{field}: {message}" if field else message, field or None)


def install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return from_validation_errors(error.errors()).response()

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        messages = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        message = messages.get(error.status_code) or str(error.detail)
        return ApiError(error.status_code, message, headers=getattr(error, "headers", None)).response()

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return ApiError(500, "internal error; the server log has the details").response()
