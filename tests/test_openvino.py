"""OpenVINO CPU engine: precisions really computed, batch policies, runner metadata, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

ov = pytest.importorskip("openvino")

from conftest import NUM_CLASSES, SIZE, make_classifier  # noqa: E402
from quench.backend import Compiled, CompileSpec, get_engine  # noqa: E402
from quench.backend.onnxruntime.runner import OnnxRuntimeRunner  # noqa: E402
from quench.backend.openvino import OpenVinoEngine, OpenVinoRunner, half, loader  # noqa: E402
from quench.backend.openvino.runner import core  # noqa: E402
from quench.errors import ModelError, QuenchError  # noqa: E402
from quench.graph import set_batch  # noqa: E402
from quench.precision import NAMES  # noqa: E402

CAPS = loader.cpu_capabilities()
HALF_TOL = 3e-2  # bf16 (8-bit mantissa) / fp16 weights: max |diff| relative to max |reference|
needs_bf16 = pytest.mark.skipif("BF16" not in CAPS, reason="this CPU has no BF16 in OpenVINO")


@pytest.fixture(scope="module")
def engine() -> OpenVinoEngine:
    eng = get_engine("openvino")
    assert isinstance(eng, OpenVinoEngine)
    return eng


@pytest.fixture(scope="module")
def float_model(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    return onnx.load(make_classifier(tmp_path_factory.mktemp("ov") / "tiny.onnx"))


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    """The tiny classifier quantized with Q/DQ pairs around Conv and Gemm (ORT static)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(1)
            batches = [rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32) for _ in range(8)]
            self._it = iter({"images": b} for b in batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    d = tmp_path_factory.mktemp("ovq")
    src = make_classifier(d / "tiny.onnx")
    out = d / "tiny-qdq.onnx"
    quantize_static(
        str(src),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "Gemm"],
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        # 7-bit weights, as Quench's portable builds: exact on CPUs without VNNI too (8-bit
        # u8 x s8 pairs saturate int16 there, e.g. under ONEDNN_MAX_CPU_ISA=AVX2)
        reduce_range=True,
    )
    model = onnx.load(out)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    return model


def batch_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime fp32 (no graph optimisation) on the same model."""
    m = set_batch(model, None)
    with OnnxRuntimeRunner(m.SerializeToString(), graph_optimization_level="disable") as run:
        return run.infer({"images": x})["logits"]


def compile_(
    engine: OpenVinoEngine, model: onnx.ModelProto, precision: str, batch: int | None = None, **kw
) -> Compiled:
    spec = CompileSpec(precision, "images", "logits", batch, **kw)
    return engine.compile(set_batch(model, batch), spec)


def run(engine: OpenVinoEngine, compiled: Compiled, x: np.ndarray, threads: int = 1) -> np.ndarray:
    with engine.runner(compiled.payloads, compiled.options, threads=threads) as r:
        return r.infer({"images": x})["logits"]


def rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - ref)) / max(1.0, np.max(np.abs(ref))))


_cache: dict[tuple[str, str, Any], Compiled] = {}


@pytest.fixture(scope="module")
def build(engine: OpenVinoEngine, float_model: onnx.ModelProto, qdq_model: onnx.ModelProto):
    """Compile once per (model, precision, batch) for the whole module."""

    def get(precision: str, batch: int | None = None) -> Compiled:
        which = "qdq" if precision.startswith("qint8") else "float"
        key = (which, precision, batch)
        if key not in _cache:
            model = qdq_model if which == "qdq" else float_model
            _cache[key] = compile_(engine, model, precision, batch)
        return _cache[key]

    return get


# --- engine -------------------------------------------------------------------------------------


def test_engine_identity(engine: OpenVinoEngine) -> None:
    assert engine.name == "openvino"
    assert engine.version() == ov.__version__
    for p in NAMES:
        assert engine.supports(p) == (p != "force_bfloat16" or "BF16" in CAPS)
    assert not engine.supports("int4")
    assert "FP32" in CAPS


def test_unsupported_precision(engine: OpenVinoEngine, float_model: onnx.ModelProto) -> None:
    with pytest.raises(QuenchError, match="cannot build precision int4"):
        compile_(engine, float_model, "int4")


def test_qint8_needs_a_qdq_model(engine: OpenVinoEngine, float_model: onnx.ModelProto) -> None:
    with pytest.raises(ModelError, match="QDQ"):
        compile_(engine, float_model, "qint8_mixed_float32")


# --- float32 stays float32 ----------------------------------------------------------------------


@needs_bf16
def test_openvino_default_would_be_bf16(float_model: onnx.ModelProto, tmp_path: Path) -> None:
    """Why the hint is pinned: without it OpenVINO computes an fp32 model in bf16 here."""
    src = tmp_path / "m.onnx"
    onnx.save(float_model, src)
    compiled = core().compile_model(ov.convert_model(str(src)), "CPU")
    assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"


@pytest.mark.parametrize("batch", [None, 3])
def test_float32_matches_onnxruntime(build, engine, float_model, batch: int | None) -> None:
    c = build("force_float32", batch)
    assert c.options["INFERENCE_PRECISION_HINT"] == "f32"
    assert c.info["stored"] == "float32" and c.info["computes"] == "float32"
    assert c.info["inference_precision"] == "float32"
    assert set(c.info["runtime_precisions"]) == {"f32"}  # no bf16/f16 node anywhere
    assert c.info["heavy_layers"]["Convolution"] == {"f32": 1}
    with engine.runner(c.payloads, c.options, threads=1) as r:
        assert r.properties()["INFERENCE_PRECISION_HINT"] == "f32"
        x = batch_of(3)
        got = r.infer({"images": x})["logits"]
    ref = reference(float_model, x)
    assert got.dtype == np.float32 and got.shape == (3, NUM_CLASSES)
    assert np.max(np.abs(got - ref)) < 1e-3
    assert rel_diff(got, ref) < 1e-4


# --- bfloat16 / float16 -------------------------------------------------------------------------


@needs_bf16
def test_bfloat16(build, engine, float_model) -> None:
    c = build("force_bfloat16")
    assert c.options["INFERENCE_PRECISION_HINT"] == "bf16"
    assert c.info["computes"] == "bfloat16" and c.info["inference_precision"] == "bfloat16"
    assert c.info["runtime_precisions"].get("bf16", 0) > 0
    assert c.info["heavy_layers"]["Convolution"] == {"bf16": 1}
    x = batch_of(4)
    got, ref = run(engine, c, x), reference(float_model, x)
    assert 0 < rel_diff(got, ref) < HALF_TOL  # really bf16 (not bit-equal to fp32), and close


def test_bfloat16_refused_without_bf16(engine, float_model, monkeypatch) -> None:
    monkeypatch.setattr(loader, "cpu_capabilities", lambda: frozenset({"FP32", "INT8"}))
    assert not engine.supports("force_bfloat16")
    assert engine.supports("force_float16") and engine.supports("qint8_mixed_float16")
    with pytest.raises(QuenchError, match="no bfloat16 support"):
        compile_(engine, float_model, "force_bfloat16")


def test_float16(build, engine, float_model) -> None:
    c32, c16 = build("force_float32"), build("force_float16")
    ratio = len(c16.payloads["model.bin"]) / len(c32.payloads["model.bin"])
    assert 0.4 < ratio < 0.6, ratio
    assert c16.info["stored"] == "float16 weights"
    hint = c16.options["INFERENCE_PRECISION_HINT"]
    if "FP16" in CAPS:  # f16 kept only where measured faster than f32
        assert hint == {"float16": "f16", "float32": "f32"}[c16.info["fp16_compute"]["computes"]]
    else:  # never bf16: it is less accurate than fp16
        assert hint == "f32" and c16.info["computes"] == loader.NO_FP16
        assert c16.info["heavy_layers"]["Convolution"] == {"f32": 1}
    assert c16.info["runtime_precisions"].get(hint, 0) > 0
    x = batch_of(4)
    assert rel_diff(run(engine, c16, x), reference(float_model, x)) < HALF_TOL


def test_float16_without_half_arithmetic_computes_f32(engine, float_model, monkeypatch) -> None:
    monkeypatch.setattr(loader, "cpu_capabilities", lambda: frozenset({"FP32", "INT8"}))
    c = compile_(engine, float_model, "force_float16")
    assert c.options["INFERENCE_PRECISION_HINT"] == "f32"
    assert c.info["computes"] == loader.NO_FP16
    assert c.info["stored"] == "float16 weights"
    assert c.info["note"].startswith("this CPU has no float16 arithmetic")
    assert set(c.info["runtime_precisions"]) == {"f32"}


def test_fp16_compute_insisted_on_without_fp16_is_an_error(engine, float_model, monkeypatch):
    monkeypatch.setattr(loader, "cpu_capabilities", lambda: frozenset({"FP32", "BF16", "INT8"}))
    with pytest.raises(QuenchError, match="--fp16-compute: this CPU has no float16 arithmetic"):
        compile_(engine, float_model, "force_float16", fp16_compute=True)


def test_fp16_measured_slower_computes_f32(engine, float_model, monkeypatch) -> None:
    """Where fp16 compute is measured slower than fp32, the artifact keeps fp16 weights and
    computes fp32, and says so; the decision's rounds are in the manifest."""
    monkeypatch.setattr(loader, "cpu_capabilities", lambda: CAPS | {"FP16"})
    timed: list[str] = []
    real = half.measure

    def fake(xml, weights, config, spec, shape):
        slow = {"f16": 70.0, "f32": 100.0}
        return real(
            xml, weights, config, spec, shape, timer=lambda h, b: timed.append(h) or slow[h] * b
        )

    monkeypatch.setattr(half, "measure", fake)
    c = compile_(engine, float_model, "force_float16")
    assert set(timed) == {"f16", "f32"}
    assert c.options["INFERENCE_PRECISION_HINT"] == "f32"
    assert c.info["stored"] == "float16 weights"
    assert c.info["computes"].startswith("float32 (float16 compute measured 0.70x float32")
    assert c.info["fp16_compute"]["computes"] == "float32"
    assert "stores float16 and computes float32" in c.info["note"]
    assert set(c.info["runtime_precisions"]) == {"f32"}


def test_fp16_timing_runs_both_computes(float_model, monkeypatch) -> None:
    """The real timing loop (both runners, interleaved rounds): here f32 stands in for f16,
    which this test's CPU may lack; equal computes are a tie, so fp32 is kept."""
    monkeypatch.setattr(half, "HINTS", {"f16": "f32", "f32": "f32"})
    monkeypatch.setattr(half, "ROUND_SECONDS", 0.02)
    xml, weights = loader.convert(set_batch(float_model, None), None, True)
    spec = CompileSpec("force_float16", "images", "logits", None, threads=1)
    d = half.measure(xml, weights, {"PERFORMANCE_HINT": "LATENCY"}, spec, (3, SIZE, SIZE))
    rounds = d.record["rounds_images_per_s"]
    assert len(rounds["f16"]) == len(rounds["f32"]) == half.ROUNDS
    assert d.record["batches"] == [1, 8] and 0.5 < d.ratio < 2
    assert d.record["computes"] == ("float16" if d.keep_fp16 else "float32")


def _rounds(f16: list[float], f32: list[float]) -> half.Decision:
    return half.decide({"f16": f16, "f32": f32}, [1, 8])


def test_fp16_decision_rule() -> None:
    noisy = [100.0, 103.0, 98.0, 101.0, 99.0, 102.0]
    assert _rounds([v * 1.3 for v in noisy], noisy).keep_fp16  # clearly faster
    assert not _rounds([v * 0.7 for v in noisy], noisy).keep_fp16  # slower
    tie = _rounds([101.0, 99.0, 102.0, 98.0, 100.0, 100.0], noisy)
    assert not tie.keep_fp16  # a tie: fp32 is as fast and more accurate
    assert "--fp16-compute keeps float16 compute" in tie.line()


@pytest.mark.skipif("FP16" in CAPS, reason="this CPU really has fp16 arithmetic")
def test_hint_not_honoured_is_an_error(engine, float_model, monkeypatch) -> None:
    """Claiming FP16 on a CPU without it: OpenVINO falls back, and the engine says so."""
    monkeypatch.setattr(loader, "cpu_capabilities", lambda: CAPS | {"FP16"})
    with pytest.raises(QuenchError, match="built to compute in f16"):
        compile_(engine, float_model, "force_float16")


@pytest.mark.parametrize(
    ("caps", "precision", "hint", "computes"),
    [
        ({"FP32", "BF16", "FP16", "INT8"}, "force_float16", "f16", "float16"),
        ({"FP32", "BF16", "INT8"}, "force_float16", "f32", "float32 (this CPU has no float16"),
        ({"FP32", "INT8"}, "force_float32", "f32", "float32"),
        ({"FP32", "BF16", "INT8"}, "qint8_mixed_float32", "f32", "int8 (quantized Conv/Gemm), fl"),
        # fp32 float layers beside int8 even with fp16 arithmetic (f16 measured broken there)
        ({"FP32", "FP16", "INT8"}, "qint8_mixed_float16", "f32", "int8 (quantized Conv/Gemm), fl"),
        ({"FP32", "BF16", "INT8"}, "qint8_mixed_float16", "f32", "int8 (quantized Conv/Gemm), fl"),
        ({"FP32", "INT8"}, "qint8_mixed_float16", "f32", "int8 (quantized Conv/Gemm), fl"),
    ],
)
def test_precision_plan(caps: set[str], precision: str, hint: str, computes: str) -> None:
    p = loader.plan(precision, frozenset(caps))
    assert p.hint == hint
    assert p.computes.startswith(computes)
    assert p.compress_to_fp16 == (precision == "force_float16")


# --- int8 (QDQ) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "tol"), [("qint8_mixed_float32", 2e-2), ("qint8_mixed_float16", 5e-2)]
)
def test_qdq_runs_int8(build, engine, qdq_model, precision: str, tol: float) -> None:
    c = build(precision)
    counts = c.info["runtime_precisions"]
    assert counts.get("u8", 0) + counts.get("i8", 0) > 0
    for layer in ("Convolution", "FullyConnected"):
        assert set(c.info["heavy_layers"][layer]) <= {"u8", "i8"}, c.info["heavy_layers"]
    # the float layers run in fp32 on every CPU (f16 beside int8 measured broken, bf16 less
    # accurate), so the artifact computes the same with and without half-precision arithmetic
    assert c.options["INFERENCE_PRECISION_HINT"] == "f32"
    assert set(counts) <= {"u8", "i8", "f32"}
    x = batch_of(4, seed=2)
    got, ref = run(engine, c, x), reference(qdq_model, x)
    assert rel_diff(got, ref) < tol
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.75


# --- batch policies and runner ------------------------------------------------------------------


def test_fixed_batch(build, engine, float_model) -> None:
    c = build("force_float32", 3)
    with engine.runner(c.payloads, c.options, threads=1) as r:
        assert r.inputs()[0].shape == (3, 3, SIZE, SIZE)
        assert r.outputs()[0].shape == (3, NUM_CLASSES)
        x = batch_of(3)
        assert rel_diff(r.infer({"images": x})["logits"], reference(float_model, x)) < 1e-4
        with pytest.raises(Exception):  # noqa: B017 - OpenVINO's own error type
            r.infer({"images": batch_of(1)})


def test_dynamic_batch(build, engine, float_model) -> None:
    c = build("force_float32")
    with engine.runner(c.payloads, c.options, threads=1) as r:
        assert r.inputs()[0].shape == ("N", 3, SIZE, SIZE)
        for n in (1, 3):
            x = batch_of(n, seed=n)
            got = r.infer({"images": x})["logits"]
            assert got.shape == (n, NUM_CLASSES)
            assert rel_diff(got, reference(float_model, x)) < 1e-4


def test_single_images_run_on_a_batch_1_compile(build, engine, float_model) -> None:
    dynamic = build("force_float32")
    with engine.runner(dynamic.payloads, dynamic.options, threads=1) as r:
        assert r._single is not None
        assert tuple(r._single.get_compiled_model().inputs[0].get_shape()) == (1, 3, SIZE, SIZE)
        x = batch_of(1, seed=7)
        got = r.infer({"images": x})["logits"]
        assert rel_diff(got, reference(float_model, x)) < 1e-4
        # the mutable-batch request still serves every other batch size
        assert r.infer({"images": batch_of(2)})["logits"].shape == (2, NUM_CLASSES)
    fixed = build("force_float32", 3)
    with engine.runner(fixed.payloads, fixed.options, threads=1) as r:
        assert r._single is None  # the batch is fixed already


def test_runner_metadata_and_names(engine, tmp_path: Path) -> None:
    model = onnx.load(make_classifier(tmp_path / "n.onnx", input_name="data", output_name="prob"))
    c = engine.compile(set_batch(model, None), CompileSpec("force_float32", "data", "prob", None))
    r = engine.runner(c.payloads, c.options, threads=1)
    assert isinstance(r, OpenVinoRunner) and not r.is_active
    with pytest.raises(RuntimeError, match="not active"):
        r.infer({"data": batch_of(1)})
    with r:
        (i,), (o,) = r.inputs(), r.outputs()
        assert (i.name, i.dtype, i.shape) == ("data", "float32", ("N", 3, SIZE, SIZE))
        assert (o.name, o.dtype, o.shape) == ("prob", "float32", ("N", NUM_CLASSES))
        first = r.infer({"data": batch_of(2, seed=0)})
        kept = first["prob"].copy()
        r.infer({"data": batch_of(2, seed=5)})
        assert set(first) == {"prob"}
        np.testing.assert_array_equal(first["prob"], kept)  # outputs are copies
        assert r.properties()["INFERENCE_NUM_THREADS"] == "1"
    assert not r.is_active


def test_options(engine, float_model) -> None:
    c = compile_(
        engine, float_model, "force_float32", options={"performance_hint": "throughput"}, threads=1
    )
    assert c.options["PERFORMANCE_HINT"] == "THROUGHPUT"
    assert c.options["INFERENCE_NUM_THREADS"] == "1"
    assert c.info["performance_hint"] == "THROUGHPUT"
    with pytest.raises(QuenchError, match="unknown OpenVINO option"):
        compile_(engine, float_model, "force_float32", options={"bogus": 1})
    with pytest.raises(QuenchError, match="follows --precision"):
        compile_(engine, float_model, "force_float32", options={"INFERENCE_PRECISION_HINT": "bf16"})
    with pytest.raises(QuenchError, match="unknown OpenVINO option"):
        engine.runner(c.payloads, {"bogus": "1"})


def test_streams_split_the_batch_and_keep_order(build, engine, float_model) -> None:
    compiled = build("force_float32")
    spec = CompileSpec("force_float32", "images", "logits", None, threads=2)
    assert {"streams": 2} in engine.variants(spec)
    assert engine.variants(CompileSpec("force_float32", "images", "logits", 4, threads=2)) == [{}]
    x = batch_of(5, seed=3)
    ref = reference(float_model, x)
    options = {**compiled.options, "streams": 2}
    with engine.runner(compiled.payloads, options, threads=2) as r:
        assert r.streams == 2 and len(r._stream_requests) == 2
        assert r.properties()["INFERENCE_PRECISION_HINT"] == "f32"
        for n in (1, 2, 5):  # 1: below the stream count, served by the latency request
            got = r.infer({"images": x[:n]})["logits"]
            assert got.shape == (n, NUM_CLASSES)
            assert rel_diff(got, ref[:n]) < 1e-4


def test_concurrent_requests_run_in_parallel_and_match(
    engine: OpenVinoEngine, build, float_model: onnx.ModelProto
) -> None:
    """`quench perf --requests N`: N requests on an N-stream throughput configuration, same
    precision, same results, callable from N threads at once."""
    import threading

    compiled = build("force_float32")
    x = batch_of(2, seed=7)
    with engine.runner(compiled.payloads, compiled.options, threads=2) as r:
        assert isinstance(r, OpenVinoRunner)
        fns = r.concurrent(2)
        assert len(fns) == 2
        n, model = r._concurrent
        assert n == 2 and int(model.get_property("NUM_STREAMS")) == 2
        assert model.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
        out: dict[int, np.ndarray] = {}
        threads = [
            threading.Thread(target=lambda i=i: out.__setitem__(i, fns[i]({"images": x})["logits"]))
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        single = r.infer({"images": x})["logits"]
    for i in range(2):
        np.testing.assert_allclose(out[i], single, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(single, reference(float_model, x), rtol=1e-3, atol=1e-3)
