"""Errors a request can get, in OpenAI's error format (``{"error": {"message", "type", "param", "code"}}``)."""

from __future__ import annotations

from typing import Any

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "server_busy"}  # fmt: skip


class ServeError(Exception):
    """What was wrong with a request (or the server), with the HTTP status it answers with."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def to_dict(self) -> dict[str, Any]:
        """The response body."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
