"""One error taxonomy for both front ends: an HTTP status (with OpenAI's error JSON) and a gRPC code."""

from __future__ import annotations

import grpc

from workers.engine.engine import ContextLengthError
from workers.engine.scheduler import QueueFull
from workers.model.store import ModelNotFound

GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              404: grpc.StatusCode.NOT_FOUND, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
              500: grpc.StatusCode.INTERNAL}
_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def __reduce__(self):  # Ray ships it between processes (gRPC errors reach Serve's proxy)
        return APIError, (self.status, self.message, self.param, self.code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return GRPC_CODES[self.status]

    @classmethod
    def from_exception(cls, e: BaseException) -> "APIError":
        """Map an engine exception (possibly wrapped by Ray as a RayTaskError) to an API error."""
        cause = getattr(e, "cause", None) or e
        if isinstance(cause, APIError):
            return cause
        if isinstance(cause, QueueFull):
            return cls(429, str(cause), code="queue_full")
        if isinstance(cause, ContextLengthError):
            return cls(400, str(cause), code="context_length_exceeded")
        if isinstance(cause, ModelNotFound):
            return cls(404, str(cause), param="model", code="model_not_found")
        if isinstance(cause, ValueError):
            return cls(400, str(cause))
        return cls(500, f"internal error: {type(cause).__name__}: {cause}")
