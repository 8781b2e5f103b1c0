"""Server settings (the ``quench serve`` options)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """Limits and batching policy of one server."""

    max_batch: int = 8  # images per engine call
    max_delay_ms: float = 5.0  # how long the batcher waits for more requests after the first
    max_queue: int = 256  # queued requests (chunks of at most max_batch images) per model
    timeout_s: float = 30.0  # per request, queueing + inference
    max_body_mb: float = 20.0  # request body limit
    name: str | None = None  # served name of a single model (default: the manifest's name)
    quiet: bool = False  # no JSON access log on stderr

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if self.max_delay_ms < 0 or self.timeout_s <= 0 or self.max_body_mb <= 0:
            raise ValueError("max_delay_ms must be >= 0, timeout_s and max_body_mb > 0")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
