"""OpenAI-style errors: one exception type for the handlers, and the handlers that shape them all.

Every failure a client can see is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status when the request was at fault and 500 only for our bugs. FastAPI's own shapes (422 with
``detail`` for validation, ``{"detail": ...}`` for 404/405) are replaced, so clients written for
OpenAI parse every error the same way; a field the API does not know is "Unrecognized request
argument supplied: X", OpenAI's own words. A request that fails never takes the server down with it:
the catch-all handler answers 500 and the next request is served as usual.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from trt_gemma.errors import TrtGemmaError
from trt_gemma.runtime.async_engine import EngineDeadError

logger = logging.getLogger("trt_gemma.server")

# HTTP status -> OpenAI's error "type" for it.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered to the client as is; raised anywhere below a route."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None,
               code: str | int | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | int | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)


def from_exception(error: Exception) -> APIError:
    """The APIError an exception maps to: our user-facing errors are 400, anything else 500.

    ConfigError (bad SamplingParams) and RequestError (bad prompt) name their field in the message
    as ``SamplingParams.top_p ...``; that name becomes ``param`` so clients can point at it.
    """
    if isinstance(error, APIError):
        return error
    if isinstance(error, EngineDeadError):
        return APIError(503, f"the engine is not running ({error})", code="engine_dead")
    if isinstance(error, TrtGemmaError):
        message = str(error)
        param = None
        if message.startswith("SamplingParams."):
            param = message.split()[0].split(".", 1)[1]
        return APIError(400, message, param=param)
    logger.exception("internal error while serving a request", exc_info=error)
    return APIError(500, f"internal server error ({type(error).__name__})")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first bad field as 'field: what is wrong', and its dotted name as param.

    A union field (``stop: str | list[str]``) fails once per member; the member whose type matched
    but whose value did not (a list too long) says more than "not a string", so it is preferred.
    """
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    if errors[0].get("type") == "json_invalid":
        why = (errors[0].get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON ({why})".replace(" ()", ""), None
    field = _field(errors[0])
    unknown = next((e for e in errors if e.get("type") == "extra_forbidden"), None)
    if unknown is not None:  # OpenAI's words for a field it does not know
        param = _param(unknown)
        return f"Unrecognized request argument supplied: {param}", param
    if field is None:
        return f"the body must be a JSON object ({errors[0].get('msg', 'invalid')})", None
    same = [e for e in errors if _field(e) == field]
    specific = [e for e in same if not str(e.get("type", "")).endswith("_type")]
    if specific or len(same) == 1:
        chosen = (specific or same)[0]
        param, message = _param(chosen), chosen.get("msg", "invalid value")
    else:  # every member of a union refused the value's type
        members = dict.fromkeys(_tag(e) for e in same if _tag(e))
        param, message = field, f"wrong type; expected one of {', '.join(members)}"
    others = len({_field(e) for e in errors}) - 1
    more = f" (and {others} more invalid fields)" if others else ""
    return f"{param}: {message}{more}", param


def _parts(error: dict) -> list[str]:
    return [str(p) for p in error.get("loc", ()) if p != "body"]


def _field(error: dict) -> str | None:
    parts = _parts(error)
    return parts[0] if parts else None


def _param(error: dict) -> str | None:
    """Dotted field path of a pydantic error, without union member tags."""
    return ".".join(p for p in _parts(error) if not _is_type_tag(p)) or None


def _tag(error: dict) -> str | None:
    return next((p for p in _parts(error) if _is_type_tag(p)), None)


def _is_type_tag(part: str) -> bool:
    # pydantic names a union member by its type: 'str', 'list[int]', 'ChatMessage', 'function-...'
    return ("[" in part or part in {"str", "int", "float", "bool", "dict", "list"}
            or part[:1].isupper() or part.startswith("function-"))


def _count(request: Request, status: int, code: str | None) -> None:
    """trt_gemma_requests_rejected_total{reason}: the error code, else the HTTP status."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.rejected.labels(code or str(status)).inc()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _count(request, exc.status, exc.code)
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        _count(request, 400, None)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route for {request.method} {request.url.path}"
        _count(request, exc.status_code, None)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(TrtGemmaError)
    async def _user_error(request: Request, exc: TrtGemmaError) -> JSONResponse:
        api = from_exception(exc)
        _count(request, api.status, api.code)
        return error_response(api.status, api.message, api.param, api.code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Starlette runs this in its outermost middleware and re-raises afterwards, so uvicorn
        # logs the traceback; the client still gets a JSON body and the server keeps serving.
        api = from_exception(exc)
        return error_response(api.status, api.message, api.param, api.code)
