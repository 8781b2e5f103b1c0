"""``quench serve --ray``: the KServe v2 app as Ray Serve replicas, spoken to with the same
tritonclient and HTTP tests as ``quench serve`` (imported from test_serve, run against it)."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

if find_spec("ray") is None:  # (not imported here: the ray_local fixture sets up auth first)
    pytest.skip('Ray is not installed: pip install "quench[ray]"', allow_module_level=True)
pytest.importorskip("tritonclient.http")

from quench.errors import QuenchError
from quench.ray.serve import Scale, start, stop
from quench.serve import ServeConfig
from test_serve import (
    NAME,
    client,
    free_port,
    jpeg,
    model,
    test_bad_requests,
    test_body_too_large,
    test_classify_raw_and_multipart,
    test_concurrent_requests_are_batched,
    test_health_and_metadata,
    test_metrics,
    test_request_larger_than_max_batch_is_split,
    test_tritonclient_infer,
    test_unknown_model_and_version,
    wait_ready,
)

__all__ = [
    "client",
    "jpeg",
    "model",
    "test_bad_requests",
    "test_body_too_large",
    "test_classify_raw_and_multipart",
    "test_concurrent_requests_are_batched",
    "test_health_and_metadata",
    "test_metrics",
    "test_request_larger_than_max_batch_is_split",
    "test_tritonclient_infer",
    "test_unknown_model_and_version",
]


@pytest.fixture(scope="module")
def server(ray_local: object, tiny_artifact: Path) -> Iterator[str]:
    """The app on Ray Serve (same settings as test_serve's server). One replica: /metrics is
    each replica's own, and test_metrics reads what its request counted; the two-node test
    runs two."""
    config = ServeConfig(
        max_batch=8, max_delay_ms=40, max_body_mb=1.0, name=NAME, quiet=True, timeout_s=10
    )
    port = free_port()
    url = start([tiny_artifact], config, Scale(1), port=port, address=None)
    wait_ready(url, timeout=60)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop()


@pytest.mark.parametrize(
    ("replicas", "autoscale", "want"),
    [(None, None, Scale(1)), (3, None, Scale(3)), (None, "1:4", Scale(1, (1, 4)))],
)
def test_scale_options(replicas: int | None, autoscale: str | None, want: Scale) -> None:
    assert Scale.parse(replicas, autoscale) == want


@pytest.mark.parametrize(("replicas", "autoscale"), [(2, "1:2"), (None, "4:2"), (None, "x")])
def test_scale_options_refused(replicas: int | None, autoscale: str) -> None:
    with pytest.raises(QuenchError):
        Scale.parse(replicas, autoscale)
