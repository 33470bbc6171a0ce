"""One error taxonomy for both front ends: an HTTP status (with OpenAI's error JSON) and a gRPC code."""

from __future__ import annotations

import grpc
from ray.exceptions import RayActorError

from workers.compute_worker import WorkerFailed
from workers.engine.engine import ContextLengthError
from workers.engine.scheduler import QueueFull
from workers.model.store import ModelNotFound

GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              404: grpc.StatusCode.NOT_FOUND, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
              500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE}
_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "server_error"}
# A dead compute worker is replaced with its replica (the health check fails), which loads the
# model again: seconds on the dev model. Clients that honour Retry-After come back after it.
RETRY_AFTER_S = 10


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
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else {}

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
        if isinstance(cause, RayActorError):  # its message names the actor's class, id and node: keep them here
            return cls(503, "the model is unavailable (its worker is restarting); retry later", code="unavailable")
        if isinstance(cause, WorkerFailed):  # Serve replaces its replica: as a restarting worker
            return cls(503, f"the model is unavailable ({cause}); retry later", code="unavailable")
        if isinstance(cause, ContextLengthError):
            return cls(400, str(cause), param=cause.param, code="context_length_exceeded")
        if isinstance(cause, ModelNotFound):
            return cls(404, str(cause), param="model", code="model_not_found")
        if isinstance(cause, ValueError):
            return cls(400, str(cause))
        return cls(500, f"internal error: {type(cause).__name__}: {cause}")
