"""Server settings (the ``quench serve`` options) and the limits every request is held to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """Limits and batching policy of one server."""

    max_batch: int = 8  # images per engine call
    max_delay_ms: float = 5.0  # how long the batcher waits for more requests after the first
    max_queue: int = 256  # queued requests (chunks of at most max_batch images) per model
    timeout_s: float = 30.0  # per request from its headers: body (408), then work (504)
    max_body_mb: float = 20.0  # request body limit
    name: str | None = None  # served name of a single model (default: the manifest's name)
    quiet: bool = False  # no JSON access log on stderr
    header_timeout_s: float = 10.0  # a connection's next request line + headers, else closed
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 256  # open connections (gRPC: RPCs at once); beyond: 503, closed
    max_image_mpix: float = 40.0  # decoded pixels per /classify image (after reduced-scale decode)
    decode_workers: int = 2  # images and JSON tensors decoded at once (memory bound)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if self.max_delay_ms < 0 or self.timeout_s <= 0 or self.max_body_mb <= 0:
            raise ValueError("max_delay_ms must be >= 0, timeout_s and max_body_mb > 0")
        if min(self.header_timeout_s, self.keep_alive_s, self.max_image_mpix) <= 0:
            raise ValueError("header_timeout_s, keep_alive_s and max_image_mpix must be > 0")
        if self.max_connections < 1 or self.decode_workers < 1:
            raise ValueError("max_connections and decode_workers must be >= 1")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_image_pixels(self) -> int:
        return int(self.max_image_mpix * 1_000_000)
