"""The exception route handlers raise (an HTTP status and a one-line reason), and start-up's."""

from __future__ import annotations

from quench.errors import QuenchError


class ServeError(Exception):
    """Answered as ``{"error": message}`` with ``status`` (KServe v2 error format)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())  # one line
        self.headers = headers or {}


class QueueFull(ServeError):
    def __init__(self, model: str) -> None:
        super().__init__(503, f"model {model!r}: queue is full, retry later", {"Retry-After": "1"})


class ShuttingDown(ServeError):
    def __init__(self, model: str) -> None:
        super().__init__(503, f"model {model!r}: server is shutting down", {"Retry-After": "1"})


class CannotListen(QuenchError):
    """The address or port cannot be bound (busy, not local, no permission)."""
