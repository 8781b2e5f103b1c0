"""``quench serve --ray`` with served names (NAME=PATH) and ``--trusted-keys``: the same
options as ``quench serve``, checked before anything is deployed and again in each replica."""

from __future__ import annotations

import json
import urllib.request
from importlib.util import find_spec
from pathlib import Path

import pytest

if find_spec("ray") is None:
    pytest.skip('Ray is not installed: pip install "quench[ray]"', allow_module_level=True)

from quench import signing
from quench.builder import build
from quench.errors import QuenchError, SignatureError
from quench.ray.serve import Scale, start, stop
from quench.serve import ServeConfig
from test_serve import free_port, wait_ready


@pytest.fixture(scope="module")
def alice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    return signing.generate(d / "alice")


@pytest.fixture(scope="module")
def signed(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    tiny_labels: Path,
    alice: tuple[Path, Path],
) -> Path:
    from conftest import TINY_BUILD

    out = tmp_path_factory.mktemp("signed") / "tiny.quench"
    key = signing.load_private_key(alice[0])
    build(tiny_model, out, labels=str(tiny_labels), sign_key=key, **TINY_BUILD).close()
    return out


def test_named_and_signed_on_ray(ray_local: object, signed: Path, alice: tuple[Path, Path]) -> None:
    from ray import serve

    serve.shutdown()  # a proxy left by an earlier test module listens on its own port
    port = free_port()
    keys = signing.trusted_keys(alice[1])
    config = ServeConfig(quiet=True)
    url = start([signed], config, Scale(1), port=port, address=None, names=["cats"],
                trusted_keys=keys)  # fmt: skip
    try:
        wait_ready(url, timeout=60)
        with urllib.request.urlopen(f"{url}/v2/models/cats", timeout=5) as r:
            assert json.loads(r.read())["name"] == "cats"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}/v2/models/tiny", timeout=5)
        assert e.value.code == 404
        # Serve keeps its first address: asking for another is refused, not ignored
        with pytest.raises(QuenchError, match=f"already runs .* at 127.0.0.1:{port}"):
            start([signed], config, Scale(1), port=free_port(), address=None)
    finally:
        stop()


def test_unsigned_refused_before_deploying(
    ray_local: object, tiny_artifact: Path, alice: tuple[Path, Path]
) -> None:
    keys = signing.trusted_keys(alice[1])
    with pytest.raises(SignatureError, match=f"{tiny_artifact}.*not signed"):
        start([tiny_artifact], ServeConfig(quiet=True), Scale(1), port=free_port(),
              address=None, trusted_keys=keys)  # fmt: skip


def test_cli_refuses_unsigned_before_connecting(
    tiny_artifact: Path, alice: tuple[Path, Path]
) -> None:
    from typer.testing import CliRunner

    from quench.cli import app

    res = CliRunner().invoke(
        app, ["serve", str(tiny_artifact), "--ray", "127.0.0.1:1", "--trusted-keys", str(alice[1])]
    )
    assert res.exit_code != 0
    line = res.stderr.strip().splitlines()[-1]
    assert str(tiny_artifact) in line and "not signed" in line and "Ray" not in line
