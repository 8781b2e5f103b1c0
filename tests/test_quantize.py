"""INT8 post-training quantization (quench.builder.quantize) on the tiny generated classifier.

Tolerances: on fresh random inputs the QDQ model must pick the same top-1 class as fp32 for at
least 90% of the images and its logits must be within 5% relative (L2) error of fp32's (8% for
``entropy``, which clips ranges hardest by design).

Most tests set ``float_first_layer=False``: the tiny model has a single Conv, which the default
would keep in float.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import SIZE, make_classifier
from quench.builder import quantize as qmod
from quench.builder.quantize import METHODS, QuantConfig, QuantResult, bias, first_layer, quantize
from quench.builder.quantize import statistics as qstats
from quench.errors import QuenchError

TOP1_AGREEMENT = 0.90
REL_ERROR = {"entropy": 0.08}
REL_ERROR_DEFAULT = 0.05
ALL_INT8 = QuantConfig(float_first_layer=False)


def _images(n: int, seed: int) -> np.ndarray:
    """Noise plus a per-image, per-channel offset, so the pooled features differ between images."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, SIZE, SIZE), dtype=np.float32)
    return x + rng.standard_normal((n, 3, 1, 1), dtype=np.float32)


def _optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT basic graph optimisation (BN folded into the conv), as the builder does."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})[0]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    path = make_classifier(tmp_path_factory.mktemp("quant") / "tiny.onnx")
    model = _optimize(onnx.load(path))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"node{i}"
    return model


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return _images(48, seed=1)


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    return _images(64, seed=2)


@pytest.fixture(scope="module")
def default_result(fp32: onnx.ModelProto, calib: np.ndarray) -> QuantResult:
    return quantize(fp32, "images", calib, QuantConfig())


def _fidelity(q: onnx.ModelProto, f: onnx.ModelProto, x: np.ndarray) -> tuple[float, float]:
    yq, yf = _run(q, x), _run(f, x)
    agree = float(np.mean(yq.argmax(1) == yf.argmax(1)))
    rel = float(np.linalg.norm(yq - yf) / np.linalg.norm(yf))
    return agree, rel


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias_correction", [False, True])
def test_methods_close_to_fp32(
    fp32: onnx.ModelProto,
    calib: np.ndarray,
    test_images: np.ndarray,
    method: str,
    bias_correction: bool,
) -> None:
    config = replace(ALL_INT8, method=method, bias_correction=bias_correction)
    res = quantize(fp32, "images", calib, config)
    ops = {n.op_type for n in res.model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert res.info["quantized_nodes"].get("Conv") == 1
    assert res.info["quantized_nodes"].get("Gemm") == 1
    assert res.info["method"] == method
    assert res.info["bias_corrected"] == (2 if bias_correction else 0)
    agree, rel = _fidelity(res.model, fp32, test_images)
    assert agree >= TOP1_AGREEMENT, (method, agree)
    assert rel < REL_ERROR.get(method, REL_ERROR_DEFAULT), (method, rel)


@pytest.mark.parametrize(
    "change",
    [
        {"activation_type": "int8"},
        {"per_channel": False},
        {"method": "percentile", "percentile": 99.9},
    ],
)
def test_options_close_to_fp32(
    fp32: onnx.ModelProto, calib: np.ndarray, test_images: np.ndarray, change: dict
) -> None:
    res = quantize(fp32, "images", calib, replace(ALL_INT8, **change))
    agree, rel = _fidelity(res.model, fp32, test_images)
    assert agree >= TOP1_AGREEMENT and rel < REL_ERROR_DEFAULT, (change, agree, rel)


def test_first_layer_float_by_default(
    fp32: onnx.ModelProto, calib: np.ndarray, test_images: np.ndarray
) -> None:
    res = quantize(fp32, "images", calib, QuantConfig())
    conv = next(n for n in res.model.graph.node if n.op_type == "Conv")
    assert conv.input[0] == "images"  # the input is not quantized ...
    assert conv.name in res.info["float_nodes"]
    assert res.info["quantized_nodes"].get("Gemm") == 1  # ... the rest is
    agree, rel = _fidelity(res.model, fp32, test_images)
    assert agree >= TOP1_AGREEMENT and rel < REL_ERROR_DEFAULT, (agree, rel)


def test_cache_round_trip_skips_calibration(
    fp32: onnx.ModelProto,
    calib: np.ndarray,
    default_result: QuantResult,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_calibration(*args: object, **kwargs: object) -> None:
        raise AssertionError("calibration ran although a cache was given")

    monkeypatch.setattr(qstats, "collect", no_calibration)
    again = quantize(fp32, "images", calib, QuantConfig(), cache=default_result.ranges)
    assert again.model.SerializeToString() == default_result.model.SerializeToString()
    assert again.ranges == default_result.ranges
    assert again.info["cache_reused"] is True
    # with a cache, the calibration images are not needed at all
    empty = np.zeros((0, 3, SIZE, SIZE), np.float32)
    third = quantize(fp32, "images", empty, QuantConfig(), cache=default_result.ranges)
    assert third.model.SerializeToString() == default_result.model.SerializeToString()


def test_cache_is_an_ort_calibration_cache(
    default_result: QuantResult, tmp_path: Path, fp32: onnx.ModelProto
) -> None:
    """The ranges bytes load with ORT's own reader (quantize_static's calibration cache)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    path = tmp_path / "cache.json"
    path.write_bytes(default_result.ranges)
    data = load_tensors_data(path)
    computed = [o for n in fp32.graph.node for o in n.output]
    assert set(computed) <= set(data.keys())
    lo, hi = data[computed[0]].range_value
    assert float(lo) <= float(hi)


def test_cache_for_other_method_is_refused(
    fp32: onnx.ModelProto, calib: np.ndarray, default_result: QuantResult
) -> None:
    other = next(m for m in METHODS if m != QuantConfig().method)
    with pytest.raises(QuenchError, match="method"):
        quantize(fp32, "images", calib, QuantConfig(method=other), cache=default_result.ranges)
    with pytest.raises(QuenchError, match="cache"):
        quantize(fp32, "images", calib, QuantConfig(), cache=b"{not json")


def test_deterministic(
    fp32: onnx.ModelProto, calib: np.ndarray, default_result: QuantResult
) -> None:
    again = quantize(fp32, "images", calib, QuantConfig())
    assert again.model.SerializeToString() == default_result.model.SerializeToString()
    assert again.ranges == default_result.ranges
    for method in ("percentile", "mse"):
        cfg = replace(ALL_INT8, method=method)
        a = quantize(fp32, "images", calib, cfg)
        b = quantize(fp32, "images", calib, cfg)
        assert a.model.SerializeToString() == b.model.SerializeToString()


def test_bias_correction_reduces_mean_error(fp32: onnx.ModelProto, calib: np.ndarray) -> None:
    """Per class, the mean (over the calibration images) of quantized - fp32 logits shrinks."""
    ref = _run(fp32, calib)
    errors = {}
    for bc in (False, True):
        config = replace(ALL_INT8, method="minmax", bias_correction=bc)
        res = quantize(fp32, "images", calib, config)
        errors[bc] = float(np.abs((_run(res.model, calib) - ref).mean(axis=0)).mean())
    assert errors[True] < errors[False], errors


def test_progress_and_info(fp32: onnx.ModelProto, calib: np.ndarray) -> None:
    calls: list[tuple[int, int]] = []
    res = quantize(fp32, "images", calib, QuantConfig(), progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1] == len(calls)
    assert res.info["calibration_images"] == len(calib)
    assert res.info["seconds"] >= 0


def test_exclude_keeps_node_in_float(fp32: onnx.ModelProto, calib: np.ndarray) -> None:
    gemm = next(n.name for n in fp32.graph.node if n.op_type == "Gemm")
    res = quantize(fp32, "images", calib, replace(ALL_INT8, exclude=(gemm,)))
    assert "Gemm" not in res.info["quantized_nodes"]
    node = next(n for n in res.model.graph.node if n.name == gemm)
    weight = {t.name for t in res.model.graph.initializer}
    assert node.input[1] in weight  # the float weight, not a DequantizeLinear output


@pytest.mark.parametrize(
    "change, match",
    [
        ({"method": "bogus"}, "unknown calibration method"),
        ({"activation_type": "int4"}, "unknown activation type"),
        ({"percentile": 20.0}, "percentile"),
        ({"exclude": ("no-such-node",)}, "no-such-node"),
    ],
)
def test_bad_config(fp32: onnx.ModelProto, calib: np.ndarray, change: dict, match: str) -> None:
    with pytest.raises(QuenchError, match=match):
        quantize(fp32, "images", calib, replace(QuantConfig(), **change))


def test_bad_inputs(fp32: onnx.ModelProto, calib: np.ndarray) -> None:
    with pytest.raises(QuenchError, match="no input"):
        quantize(fp32, "pixels", calib, QuantConfig())
    with pytest.raises(QuenchError, match="calibration"):
        quantize(fp32, "images", calib[:, :, :8, :8], QuantConfig())
    with pytest.raises(QuenchError, match="no calibration images"):
        quantize(fp32, "images", calib[:0], QuantConfig())


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 1, 1, 1]},
        {"pads": [0, 1, 2, 1], "strides": [2, 2]},
        {"pads": [2, 2, 2, 2], "dilations": [2, 2], "group": 2},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2], "group": 4},
        {},
    ],
)
def test_bias_shift_matches_conv_of_the_mean(attrs: dict) -> None:
    """For an input constant per channel, the predicted mean shift is exact."""
    rng = np.random.default_rng(3)
    group = attrs.get("group", 1)
    dw = rng.standard_normal((8, 4 // group, 3, 3)).astype(np.float32)
    mean = rng.standard_normal(4).astype(np.float32)
    x = np.broadcast_to(mean[None, :, None, None], (1, 4, 9, 7)).copy()
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], **attrs)
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 9, 7])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(dw, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x})[0].mean(axis=(0, 2, 3))
    got = bias._bias_shift(node, dw.astype(np.float64), mean.astype(np.float64), [4, 9, 7])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_runs_on_openvino(
    fp32: onnx.ModelProto, calib: np.ndarray, test_images: np.ndarray
) -> None:
    ov = pytest.importorskip("openvino")
    res = quantize(fp32, "images", calib, ALL_INT8)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(res.model.SerializeToString(), b""), "CPU")
    got = compiled(test_images)[0]
    ref = _run(fp32, test_images)
    assert float(np.mean(got.argmax(1) == ref.argmax(1))) >= TOP1_AGREEMENT
    assert float(np.linalg.norm(got - ref) / np.linalg.norm(ref)) < REL_ERROR_DEFAULT


# -- first layer on the pixel grid --------------------------------------------------------------
GRID_MEAN, GRID_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def _pixel_images(n: int, seed: int) -> np.ndarray:
    """Normalised whole-pixel images, as the preprocessing makes them."""
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 256, (n, 3, SIZE, SIZE)).astype(np.float64)
    p = np.clip(p * 0.3 + rng.integers(0, 180, (n, 3, 1, 1)), 0, 255).round()
    mean = np.asarray(GRID_MEAN)[None, :, None, None]
    std = np.asarray(GRID_STD)[None, :, None, None]
    return ((p - mean) / std).astype(np.float32)


def test_pixel_grid_rewrite_is_the_same_function(fp32: onnx.ModelProto) -> None:
    """Pad * std + mean, then the Conv with folded weights and no padding: same outputs."""
    model = qmod._prepare(fp32, "images")
    rewritten, grid, helpers = first_layer.pixel_grid_first_conv(
        model, "images", GRID_MEAN, GRID_STD
    )
    assert grid is not None and len(helpers) == 3  # Pad, Mul, Add
    conv = next(n for n in rewritten.graph.node if n.op_type == "Conv")
    assert conv.input[0] == grid
    assert list(next(a for a in conv.attribute if a.name == "pads").ints) == [0, 0, 0, 0]
    x = _pixel_images(8, seed=3)
    np.testing.assert_allclose(_run(rewritten, x), _run(fp32, x), rtol=1e-4, atol=1e-4)
    # the Conv now reads whole pixel values
    probe = onnx.ModelProto.FromString(rewritten.SerializeToString())
    probe.graph.output.append(
        onnx.helper.make_tensor_value_info(grid, onnx.TensorProto.FLOAT, None)
    )
    pixels = _run_all(probe, x)[1]
    interior = pixels[:, :, 1:-1, 1:-1]
    np.testing.assert_allclose(interior, np.round(interior), atol=1e-3)
    assert interior.min() >= -1e-3 and interior.max() <= 255 + 1e-3


def _run_all(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})


def test_pixel_grid_quantizes_the_first_layer_exactly(
    fp32: onnx.ModelProto, calib: np.ndarray
) -> None:
    x = _pixel_images(48, seed=4)
    grid = replace(ALL_INT8, input_grid=(GRID_MEAN, GRID_STD))
    res = quantize(fp32, "images", x, grid)
    assert res.info["first_layer_pixel_grid"] is True
    assert res.info["quantized_nodes"].get("Conv") == 1
    g = res.model.graph
    q = next(
        n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == "quench_pixel_grid"
    )
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    assert float(inits[q.input[1]]) == pytest.approx(1.0)  # step 1 ...
    assert int(inits[q.input[2]]) == 0  # ... from 0: the 256 pixel values exactly
    # the Conv sees the pixel values themselves; quantizing the normalised input does not
    test = _pixel_images(4, seed=5)
    pixels = test * np.asarray(GRID_STD, np.float32)[None, :, None, None]
    pixels += np.asarray(GRID_MEAN, np.float32)[None, :, None, None]
    seen = _conv_input(res.model, test)[:, :, 1:-1, 1:-1]  # interior (padding taps: mean)
    np.testing.assert_allclose(seen, np.round(pixels), atol=1e-3)
    naive = quantize(fp32, "images", x, ALL_INT8)
    assert np.abs(_conv_input(naive.model, test) - test).max() > 1e-3


def _conv_input(model: onnx.ModelProto, x: np.ndarray, output: bool = False) -> np.ndarray:
    """What the (first) Conv reads (the output of the DequantizeLinear feeding it), or with
    ``output`` what it writes."""
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    conv = next(n for n in probe.graph.node if n.op_type == "Conv")
    name = conv.output[0] if output else conv.input[0]
    probe.graph.output.append(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    )
    return _run_all(probe, x)[1]


def test_pixel_grid_skipped_when_the_graph_does_not_fit(fp32: onnx.ModelProto) -> None:
    model = qmod._prepare(fp32, "images")
    same, grid, helpers = first_layer.pixel_grid_first_conv(model, "images", (0.0,) * 2, (1.0,) * 2)
    assert grid is None and helpers == [] and same is model  # 3 input channels, 2 given
    # float_first_layer=None: the pixel grid where it fits, else the first layer stays float
    x = _pixel_images(16, seed=9)
    for mean_std, on_grid in (((GRID_MEAN, GRID_STD), True), (((0.0,) * 2, (1.0,) * 2), False)):
        res = quantize(
            fp32, "images", x, replace(QuantConfig(), float_first_layer=None, input_grid=mean_std)
        )
        assert res.info["first_layer_pixel_grid"] is on_grid
        first_conv = next(n.name for n in fp32.graph.node if n.op_type == "Conv")
        assert (first_conv in res.info["float_nodes"]) is not on_grid


def test_gptq_rounding_cuts_the_first_layer_output_error(
    fp32: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On images it did not see, the pixel-grid Conv rounded by GPTQ is closer to the float Conv
    than the same Conv rounded to nearest (same scales, same ranges)."""
    calib, test = _pixel_images(48, seed=6), _pixel_images(16, seed=7)
    grid = replace(ALL_INT8, input_grid=(GRID_MEAN, GRID_STD), bias_correction=False)
    gptq = quantize(fp32, "images", calib, grid)
    with monkeypatch.context() as m:  # ONNX Runtime's rounding (to nearest) left as it is
        m.setattr(first_layer, "gptq_first_layer", lambda *args: None)
        nearest = quantize(fp32, "images", calib, grid)
    assert gptq.info["first_layer_rounding"] == "gptq"
    err = gptq.info["first_layer_output_error"]
    assert err["rounded"] < 0.5 * err["nearest"]  # on the calibration moments
    ref = first_layer.pixel_grid_first_conv(
        qmod._prepare(fp32, "images"), "images", GRID_MEAN, GRID_STD
    )
    want = _conv_input(ref[0], test, output=True)
    mse = [
        float(np.mean((_conv_input(r.model, test, output=True) - want) ** 2))
        for r in (gptq, nearest)
    ]
    assert mse[0] < 0.7 * mse[1]
    assert _conv_input(gptq.model, test, output=True).shape == want.shape


def test_gptq_round() -> None:
    """Uncorrelated inputs: GPTQ is rounding to nearest; correlated ones: a smaller output error
    than nearest, every weight still on the int8 grid."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3))
    scale = np.abs(w).reshape(8, -1).max(axis=1) / 127
    nearest = np.clip(np.round(w / scale[:, None, None, None]), -127, 127)
    same = first_layer._gptq_round(w, scale, np.eye(27))
    np.testing.assert_array_equal(same, nearest)
    mix = rng.standard_normal((27, 27))
    p = rng.standard_normal((4000, 27)) @ mix + 3.0  # correlated, not centred (like pixels)
    h = p.T @ p / len(p)
    q = first_layer._gptq_round(w, scale, h)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127

    def err(ints: np.ndarray) -> float:
        e = (ints * scale[:, None, None, None] - w).reshape(8, -1)
        return float(np.einsum("oi,ij,oj->", e, h, e))

    assert err(q) < 0.5 * err(nearest)


def test_pixel_grid_cache_keeps_the_moments(fp32: onnx.ModelProto) -> None:
    """The first layer's input moments travel in the cache: a rebuild from it, without images,
    is the same model; a cache without them is refused with a clear message."""
    calib = _pixel_images(24, seed=8)
    grid = replace(ALL_INT8, input_grid=(GRID_MEAN, GRID_STD))
    first = quantize(fp32, "images", calib, grid)
    again = quantize(fp32, "images", calib[:0], grid, cache=first.ranges)
    assert again.model.SerializeToString() == first.model.SerializeToString()
    doc = json.loads(first.ranges)
    assert doc["quench"]["first_layer_moments"]["size"] == 27  # 3 channels x 3 x 3
    del doc["quench"]["first_layer_moments"]
    with pytest.raises(QuenchError, match="first-layer input moments"):
        quantize(fp32, "images", calib[:0], grid, cache=json.dumps(doc).encode())


def test_quiet_silences_only_onnxruntime_quantization(caplog: pytest.LogCaptureFixture) -> None:
    """The quantizer's silencer leaves the caller's logging alone (no process-wide disable)."""
    import logging

    import onnxruntime.quantization as ortq

    from quench.builder.quantize.qdq import quiet

    where = str(Path(ortq.__file__).parent / "quantize.py")
    ort_record = logging.LogRecord("root", logging.WARNING, where, 1, "ort noise", None, None)
    with caplog.at_level(logging.WARNING), quiet():
        logging.getLogger("my.app").warning("mine")
        logging.getLogger().handle(ort_record)
        logging.getLogger("onnxruntime.quantization.calibrate").warning("ort named")
        assert logging.root.manager.disable == 0
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["mine"]
    assert logging.getLogger("onnxruntime.quantization").level == logging.NOTSET
