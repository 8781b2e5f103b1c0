"""quench perf: measurement, table, JSON, peak arithmetic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import quench
from quench import perf
from quench.cli import app
from quench.perf import peak, timing

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_perf_model_fields(tiny_artifact: Path) -> None:
    model = quench.load(tiny_artifact)
    res = perf.perf_model(model, [1, 3], iterations=7, warmup=2, progress=False)
    assert [r.batch for r in res] == [1, 3]
    for r in res:
        assert r.iterations == 7 and r.qps > 0 and r.seconds > 0
        assert set(r.latency_ms) == {"p50", "p90", "p99", "mean", "min", "max"}
        assert (
            r.latency_ms["min"] <= r.latency_ms["p50"] <= r.latency_ms["p99"] <= r.latency_ms["max"]
        )
        assert r.qps == pytest.approx(r.batch * r.iterations / r.seconds, rel=0.01)
        assert r.compute == "float32" and r.precision == "force_float32"
        assert r.macs_per_image == model.manifest["model"]["macs_per_image"] > 0
        peak, _ = perf.peak_macs("float32", r.threads)
        assert r.peak_share == pytest.approx(r.macs_per_image * r.qps / peak, rel=0.01)


def test_perf_cli_table_and_json(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "perf.json"
    res = invoke(
        "perf", tiny_artifact, "--batch", "1,2", "--iterations", 5, "--warmup", 1, "--json", out
    )
    assert res.exit_code == 0, res.output
    for col in (
        "Model",
        "Quant_Mode",
        "Batch_Size",
        "Throughput (qps)",
        "device",
        "p99 ms",
        "% of peak",
    ):
        assert col in res.stdout
    assert "peak float32:" in res.stderr and "clock used: " in res.stderr
    doc = json.loads(out.read_text())
    assert doc["clock"]["source"] in ("measured", "QUENCH_CPU_CLOCK_GHZ", "reported")
    assert doc["clock"]["how"] and doc["machine"]["clock"] == doc["clock"]
    assert doc["machine"]["cores"] >= 1
    assert "float32" in doc["peak"] and doc["peak"]["float32"]["macs_per_second"] > 0
    assert [r["batch"] for r in doc["results"]] == [1, 2]
    assert all(r["iterations"] == 5 for r in doc["results"])
    assert {"qps", "latency_ms", "peak_share", "engine", "precision"} <= set(doc["results"][0])


def test_perf_raw_onnx_baseline(tiny_model: Path) -> None:
    res = invoke("perf", tiny_model, "--batch", "2", "--iterations", 3, "--warmup", 0)
    assert res.exit_code == 0, res.output
    assert "onnx (source)" in res.stdout


@pytest.mark.parametrize(
    "args", [["--batch", "0"], ["--batch", "a,b"], ["--iterations", "3", "--duration", "1"]]
)
def test_perf_usage_errors(tiny_artifact: Path, args: list[str]) -> None:
    assert invoke("perf", tiny_artifact, *args).exit_code == 2


def test_perf_fixed_batch_mismatch(tmp_path: Path, tiny_model: Path, tiny_labels: Path) -> None:
    from conftest import TINY_BUILD

    m = quench.build(
        str(tiny_model), str(tmp_path / "b2.quench"), labels=str(tiny_labels), batch=2, **TINY_BUILD
    )
    res = invoke("perf", m.path, "--batch", "1,2", "--iterations", 2)
    assert res.exit_code == 1
    assert "fixed batch 2" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert invoke("perf", m.path, "--batch", "2", "--iterations", 2).exit_code == 0
    out = tmp_path / "p.json"  # no --batch: a fixed-batch artifact is timed at its batch
    assert invoke("perf", m.path, "--iterations", 2, "--json", out).exit_code == 0
    assert [r["batch"] for r in json.loads(out.read_text())["results"]] == [2]


def _cpu(monkeypatch: pytest.MonkeyPatch, flags: list[str], family: int = 26) -> None:
    info = {"vendor": "AuthenticAMD", "family": family, "flags": flags}
    monkeypatch.setattr(peak, "cpu_info", lambda: info)
    monkeypatch.setattr(peak, "default_threads", lambda: 2)
    monkeypatch.setattr(peak, "clock_hz", lambda: 3.0e9)


def test_peak_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu(monkeypatch, ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"])
    assert perf.peak_macs("float32")[0] == 2 * 3.0e9 * 32
    assert perf.peak_macs("bfloat16")[0] == 2 * 3.0e9 * 64
    assert perf.peak_macs("int8")[0] == 2 * 3.0e9 * 128
    assert perf.peak_macs("float16")[0] == 2 * 3.0e9 * 32  # no AVX512-FP16
    assert "VNNI" in perf.peak_macs("int8")[1]
    _cpu(monkeypatch, ["avx2", "fma", "avx512f"], family=25)  # Zen 4: 512-bit ops split in two
    assert perf.peak_macs("float32")[0] == 2 * 3.0e9 * 16
    assert perf.peak_macs("int8")[0] == 2 * 3.0e9 * 16 * 2
    _cpu(monkeypatch, ["avx2", "fma"])
    assert perf.peak_macs("float32", threads=1)[0] == 3.0e9 * 16


@pytest.mark.parametrize(
    ("mode", "computes", "expected"),
    [
        ("force_float32", "float32", "float32"),
        ("force_bfloat16", "bfloat16", "bfloat16"),
        ("force_float16", "bfloat16 (this CPU has no float16 arithmetic)", "bfloat16"),
        ("force_float16", "float16", "float16"),
        ("qint8_mixed_float16", "int8 ...", "int8"),
    ],
)
def test_compute_of(mode: str, computes: str, expected: str) -> None:
    assert perf.compute_of({"precision": {"mode": mode, "computes": computes}}) == expected


def test_perf_end_to_end_images(tiny_artifact: Path, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "perf.json"
    res = invoke(
        "perf",
        tiny_artifact,
        "--batch",
        "2",
        "--iterations",
        3,
        "--warmup",
        0,
        "--images",
        image_dir,
        "--json",
        out,
    )
    assert res.exit_code == 0, res.output
    assert "end-to-end batch 2:" in res.stdout and "naive decode-then-infer loop" in res.stdout
    e2e = json.loads(out.read_text())["end_to_end"][0]
    assert e2e["images"] == 7 and e2e["pipeline"]["failed"] == 0
    assert e2e["pipeline"]["images_per_s"] > 0 and e2e["naive_loop"]["images_per_s"] > 0
    raw = invoke("perf", tmp_path / "x.onnx", "--images", image_dir)
    assert raw.exit_code == 2


def test_perf_requests_in_flight(tiny_artifact: Path, tiny_model: Path, tmp_path: Path) -> None:
    model = quench.load(tiny_artifact)
    res = perf.perf_model(model, [1, 2], iterations=12, warmup=2, progress=False, requests=3)
    for r in res:
        assert r.requests == 3 and r.iterations == 12 and r.qps > 0
        assert r.qps == pytest.approx(r.batch * r.iterations / r.seconds, rel=0.01)
    assert perf.perf_model(model, [1], iterations=3, warmup=0, progress=False)[0].requests == 1
    out = tmp_path / "perf.json"
    cli = invoke("perf", tiny_artifact, "--batch", "1", "--iterations", 6, "--requests", 2)
    assert cli.exit_code == 0, cli.output
    assert "requests)" in cli.stdout  # the device column says how many (wrapped)
    cli = invoke(
        "perf", tiny_model, "--batch", "2", "--iterations", 4, "--requests", 2, "--json", out
    )
    assert cli.exit_code == 0, cli.output
    assert json.loads(out.read_text())["results"][0]["requests"] == 2
    assert invoke("perf", tiny_artifact, "--requests", 0).exit_code == 2


def test_measure_runs_requests_at_once() -> None:
    """Two requests that each take 50 ms complete twice as many requests per second as one."""
    import threading
    import time

    active, peak = [0], [0]
    lock = threading.Lock()

    def slow(x: object) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1

    n, secs, lat = perf.measure([slow, slow], (3, 4, 4), 1, duration=0.5, warmup=0)
    assert peak[0] == 2
    assert n / secs > 1.5 / 0.05 * 0.8  # ~40 requests/s with two in flight (one: ~20)
    assert len(lat) == n and lat.min() >= 0.05
    with pytest.raises(RuntimeError, match="boom"):
        perf.measure(
            [slow, lambda x: (_ for _ in ()).throw(RuntimeError("boom"))], (3, 4, 4), 1, 3, warmup=0
        )


def test_rounds_alternate_between_batch_sizes() -> None:
    calls: list[int] = []
    res = perf.sweep(
        lambda x: calls.append(len(x)),
        (3, 4, 4),
        [1, 2],
        perf.Timing(iterations=4, warmup=2, rounds=2),
        False,
        macs=None,
        compute="float32",
        threads=1,
        model="m",
        precision="p",
        engine="e",
    )
    # size 1: 2 warm-up + 2 timed; size 2 the same; then one warm-up call and 2 timed each
    assert calls == [1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 2, 2, 2]
    for r in res:
        assert r.iterations == 4 and len(r.rounds) == 2 and r.qps_spread["n"] == 2
        assert r.machine_load is not None and r.machine_load["cores"] >= 1


def test_unstable_rounds_are_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected round timings: 10 iterations in 0.1 s, then in 0.2 s: CV far above 5%."""
    import numpy as np

    secs = iter([0.1, 0.2, 0.1, 0.1, 0.1, 0.1])

    def fake_measure(infer, shape, batch, n, duration, warmup, on_step=None, x=None):
        s = next(secs)
        return 10, s, np.full(10, s / 10)

    monkeypatch.setattr(timing, "measure", fake_measure)
    kw = dict(macs=None, compute="float32", threads=1, model="m", precision="p", engine="e")
    (r,) = perf.sweep(print, (1,), [4], perf.Timing(rounds=2), False, **kw)
    assert [x["qps"] for x in r.rounds] == [400.0, 200.0]
    assert r.qps == pytest.approx(40 * 2 / 0.3, rel=1e-3)
    assert r.qps_spread["min"] == 200 and r.qps_spread["max"] == 400
    assert r.unstable and "batch 4 throughput: varied" in r.warnings[0]
    (steady,) = perf.sweep(print, (1,), [4], perf.Timing(rounds=4), False, **kw)
    assert steady.qps_spread["cv"] == 0 and not any("varied" in w for w in steady.warnings)
    row = perf.perf_row(r.to_dict())
    assert row[3].endswith("!") and row[5] == "200.0-400.0 (47.1%)"


def test_perf_cli_rounds_percentiles_and_stability(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "perf.json"
    res = invoke(
        "perf", tiny_artifact, "--batch", "1,2", "--iterations", 9, "--rounds", 3,
        "--percentile", "95,99.9", "--warmup", 1, "--json", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert re.search(r"\d+\.\d-\d+\.\d \(\d+\.\d%\)", res.stdout)  # qps range (CV)
    assert "batch 2: latency min = " in res.stdout and "percentile(99.9%) = " in res.stdout
    doc = json.loads(out.read_text())
    r = doc["results"][0]
    assert len(r["rounds"]) == 3 and sum(1 for _ in r["rounds"]) == r["qps_spread"]["n"]
    assert {"min", "median", "mean", "max", "cv"} <= set(r["qps_spread"])
    assert {"p95", "p99.9", "min", "mean", "max"} <= set(r["latency_ms"])
    st = doc["stability"]
    assert st["unstable"] == bool(st["warnings"]) and st["cv_bound"] == 0.05
    assert st["machine_load"]["cores"] >= 1
    for bad in ("0", "abc", "100"):
        assert invoke("perf", tiny_artifact, "--percentile", bad).exit_code == 2


@pytest.fixture(scope="module")
def tiny_openvino(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_labels: Path):
    from conftest import TINY_BUILD

    out = tmp_path_factory.mktemp("ov") / "tiny-ov.quench"
    quench.build(tiny_model, out, labels=str(tiny_labels), **{**TINY_BUILD, "engine": "openvino"})
    return out


def test_startup_times_like_benchmark_app(
    tiny_artifact: Path, tiny_model: Path, tmp_path: Path
) -> None:
    for src in (tiny_artifact, tiny_model):
        out = tmp_path / f"{src.suffix}.json"
        res = invoke("perf", src, "--batch", "2", "--iterations", 3, "--warmup", 0, "--json", out)
        assert res.exit_code == 0, res.output
        assert re.search(
            r"load [\d.]+ ms, compile [\d.]+ ms, first inference [\d.]+ ms", res.stdout
        )
        st = json.loads(out.read_text())["startup"]
        assert st["load_ms"] > 0 and st["compile_ms"] > 0 and st["first_inference_ms"] > 0


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_profile_per_layer(
    engine: str, tiny_artifact: Path, tiny_openvino: Path, tmp_path: Path
) -> None:
    art = tiny_artifact if engine == "onnxruntime" else tiny_openvino
    out = tmp_path / "p.json"
    res = invoke(
        "perf", art, "--batch", "1,2", "--iterations", 2, "--warmup", 0, "--profile",
        "--profile-top", 2, "--json", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"per-layer profile: {engine}, batch 2" in res.stdout and "time by op:" in res.stdout
    prof = json.loads(out.read_text())["profile"]
    assert prof["engine"] == engine and prof["batch"] == 2 and prof["runs"] == 20
    layers = prof["layers"]
    ops = {x["op"] for x in layers}
    assert ({"Conv", "Gemm"} if engine == "onnxruntime" else {"Convolution"}) <= ops
    assert all(x["precision"] == "f32" and x["ms"] >= 0 for x in layers)
    assert [x["ms"] for x in layers] == sorted((x["ms"] for x in layers), reverse=True)
    assert sum(x["share"] for x in layers) == pytest.approx(1.0, abs=1e-3)
    shown = [ln for ln in res.stdout.splitlines() if re.match(r"│\s+\d+ │", ln)]
    assert len(shown) == 2  # --profile-top
    assert invoke("perf", tmp_path / "m.onnx", "--profile").exit_code == 2


def test_profile_summary_adds_up_runs() -> None:
    from quench.backend.base import LayerTime
    from quench.profile import by_op, summarize

    times = [
        LayerTime("conv1", "Conv", "u8", 3.0),
        LayerTime("fc", "Gemm", "f32", 1.0),
        LayerTime("conv1", "Conv", "u8", 5.0),
        LayerTime("conv2", "Conv", "u8", 1.0),
        LayerTime("fc", "Gemm", "f32", 1.0),
    ]
    layers = summarize(times, runs=2)
    assert [(x.name, x.ms) for x in layers] == [("conv1", 4.0), ("fc", 1.0), ("conv2", 0.5)]
    assert layers[0].share == pytest.approx(8 / 11)
    ops = by_op(layers)
    assert ops[0] == {"op": "Conv", "precision": "u8", "layers": 2, "ms": 4.5, "share": 0.81818}


def test_pin_streams_and_input_images(
    tiny_artifact: Path, tiny_openvino: Path, image_dir: Path, tmp_path: Path
) -> None:
    import os

    before = os.sched_getaffinity(0)
    out = tmp_path / "p.json"
    res = invoke(
        "perf", tiny_openvino, "--batch", "2", "--iterations", 4, "--warmup", 0, "--pin", "0",
        "--streams", 2, "--input-images", image_dir, "--json", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    r = doc["results"][0]
    assert doc["pinned_cpus"] == [0] and r["threads"] == 1
    assert r["streams"] == 2 and r["requests"] == 2 and r["inputs"] == "7 images"
    assert "2 streams" in res.stdout
    assert os.sched_getaffinity(0) == before  # restored
    # ONNX Runtime has no streams; bad CPU lists and unreadable images: one line each
    res = invoke("perf", tiny_artifact, "--streams", 2, "--iterations", 2)
    assert res.exit_code == 1 and "ONNX Runtime has no streams" in res.stderr
    res = invoke("perf", tiny_artifact, "--pin", "0-999", "--iterations", 2)
    assert res.exit_code == 1 and "--pin 0-999: this machine has CPUs" in res.stderr
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"not a jpeg")
    res = invoke("perf", tiny_artifact, "--input-images", tmp_path / "imgs", "--iterations", 2)
    assert res.exit_code == 1 and "bad.jpg" in res.stderr and "Traceback" not in res.output
    assert invoke("perf", tmp_path / "m.onnx", "--input-images", image_dir).exit_code == 2


def test_perf_table_never_breaks_a_figure(capsys: pytest.CaptureFixture[str]) -> None:
    """A fast model's figures are long: they stay on one line (the text columns fold)."""
    from quench.cli import _print_perf

    class Result:
        def to_dict(self) -> dict:
            return {
                "model": "a-long-model-name-resnet50-v1-7-replica",
                "precision": "qint8_mixed_float32",
                "batch": 8,
                "qps": 123456.78,
                "engine": "onnxruntime",
                "threads": 2,
                "qps_spread": {"min": 100000.1, "max": 234567.8, "cv": 0.123},
                "latency_ms": {"p50": 0.01, "p90": 0.02, "p99": 0.03},
                "peak_share": 0.123,
                "warnings": ["unstable"],
            }

    _print_perf([Result()])
    out = capsys.readouterr().out
    assert "100000.1-234567.8 (12.3%)" in out and "123456.78!" in out
    assert "…" not in out  # nothing cut off
