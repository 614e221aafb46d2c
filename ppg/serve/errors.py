"""OpenAI-shaped errors for ``ppg serve``: ``{"error": {"message", "type", "param", "code"}}``.

Every way a request can fail ends here: our own refusals (`APIError`), request validation (pydantic,
with ``param`` as the field path the client wrote, e.g. ``messages[0].role``), Starlette's routing
errors (404, 405, an unparseable body), and, for bugs only, a 500 that names no internals. Kept out
of ``app.py`` so the server class reads as the request path.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ppg.serve.schemas import ErrorDetail, ErrorResponse

logger = logging.getLogger("ppg.serve")


class APIError(Exception):
    """A request the server refuses; becomes an OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def __reduce__(self):  # crosses process lines intact (a DeploymentHandle caller gets it back)
        return APIError, (self.status, self.message, self.param, self.code, self.type)


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def param_path(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def documented(*statuses: int) -> dict:
    """OpenAPI entries for the error answers a route gives, so the spec (``/openapi.json``) tells
    clients and schema-based fuzzers the truth."""
    what = {
        400: "a client mistake; `param` names the field",
        401: "missing or wrong bearer token",
        404: "unknown model",
        503: "this replica's engine failed; Serve replaces it",
    }
    return {s: {"model": ErrorResponse, "description": what[s]} for s in statuses}


async def _api_error(request: Request, exc: APIError):
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)


async def _validation_error(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return error_response(
            400, f"malformed JSON body: {first.get('msg')}", "invalid_request_error", None, "json_invalid"
        )
    param = param_path(tuple(first.get("loc", ())))
    if param is None and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        # no body, `null`, a list, or a body sent without content-type: application/json
        return error_response(
            400,
            "the body must be a JSON object with at least 'messages' (content-type: application/json)",
            "invalid_request_error",
            None,
            "invalid_body",
        )
    if first.get("type") == "extra_forbidden":  # a field we would otherwise drop: say so instead
        return error_response(
            400,
            f"{param}: not supported by this server (see the README's list of supported fields)",
            "invalid_request_error",
            param,
            "unsupported_parameter",
        )
    message = str(first.get("msg")).removeprefix("Value error, ")
    message = f"{param}: {message}" if param else message
    if first.get("type") == "literal_error" and param and param.endswith(".role"):
        message += " (roles: system, developer, user, assistant; give a persona as the system message)"
    return error_response(400, message, "invalid_request_error", param, first.get("type"))


async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)


async def _server_error(request: Request, exc: Exception):
    logger.exception("unhandled error on %s", request.url.path)
    return error_response(
        500, f"internal error ({type(exc).__name__}); see the replica's log", "server_error"
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
