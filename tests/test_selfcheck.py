"""INT8 right on every CPU: 7-bit portable weights, the build's fidelity gate on held-out
calibration images, and the self-check an artifact runs on a host unlike its build host."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import NUM_CLASSES, TINY_BUILD, make_calib_images, make_image
from quench import artifact, hw, selfcheck
from quench.builder import build
from quench.model import Model
from test_cli import invoke

openvino = pytest.importorskip("openvino")

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
# full-range int8 weights are exact only where int8 products accumulate in int32
needs_int32_accumulation = pytest.mark.skipif(
    not hw.int8_accumulates_in_int32(capped=False),
    reason="this CPU has no VNNI/AMX: a native build is the portable one here",
)


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_calib_images(tmp_path_factory.mktemp("calib"), 20, seed=300)


def _int8(tmp_path: Path, tiny_model: Path, tiny_labels: Path, calib: Path, name: str, **kw):
    opts = {**TINY_BUILD, "engine": "openvino", **kw}
    return build(
        tiny_model,
        tmp_path / f"{name}.quench",
        labels=str(tiny_labels),
        precision="qint8_mixed_float32",
        calib_images=str(calib),
        **opts,
    )


def _weights(m: Model) -> list[np.ndarray]:
    """The int8 weight initializers of an ONNX Runtime artifact's QDQ model."""
    q = onnx.load_from_string(m.artifact.payloads["model.onnx"])
    return [
        numpy_helper.to_array(t)
        for t in q.graph.initializer
        if t.data_type == onnx.TensorProto.INT8
    ]


# -- figures and host comparison ------------------------------------------------------------


def test_fidelity_figures() -> None:
    ref = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    same = selfcheck.fidelity(ref.copy(), ref)
    assert same["top1_agreement"] == 1.0 and same["sqnr_db"] == selfcheck.SQNR_CAP_DB
    noisy = selfcheck.fidelity(ref + 0.1, ref)
    assert 20 < noisy["sqnr_db"] < 30 and noisy["max_abs_diff"] == pytest.approx(0.1)
    flipped = selfcheck.fidelity(np.roll(ref, 1, axis=1), ref)
    assert flipped["top1_agreement"] == 0.0
    nan = selfcheck.fidelity(np.full_like(ref, np.nan), ref)
    assert nan["sqnr_db"] == -selfcheck.SQNR_CAP_DB
    json.dumps(nan, allow_nan=False)  # plain JSON: no infinities in a manifest


def test_differences_name_what_differs() -> None:
    base = {"machine": "x86_64", "flags": ["avx2", "avx512_vnni"], "onednn_max_cpu_isa": None}
    base |= {"engine": "openvino", "engine_version": "1"}
    assert selfcheck.differences(base, dict(base)) == []
    other = {**base, "flags": ["avx2"], "onednn_max_cpu_isa": "AVX2", "engine_version": "2"}
    d = selfcheck.differences(base, other)
    assert "CPU without avx512_vnni here" in d
    assert "ONEDNN_MAX_CPU_ISA unset (build) vs AVX2 (here)" in d
    assert "openvino 1 (build) vs openvino 2 (here)" in d


@pytest.mark.parametrize(
    ("flags", "cap", "expected"),
    [
        (["avx2", "avx512f", "avx512_vnni", "amx_int8"], None, "amx"),
        (["avx2", "avx512f", "avx512_vnni", "amx_int8"], "AVX2", "avx2"),
        (["avx2", "avx512f", "avx512_vnni", "amx_int8"], "AVX512_CORE", "avx512"),
        (["avx2", "avx512f", "avx512_vnni", "amx_int8"], "AVX512_CORE_VNNI", "vnni"),
        (["avx2", "avx512f", "avx512_vnni"], "AVX512_CORE_AMX", "vnni"),
        (["avx2", "avx_vnni"], None, "vnni"),
        (["avx2", "avx512f"], None, "avx512"),
        (["avx2"], None, "avx2"),
    ],
)
def test_int8_class(monkeypatch: pytest.MonkeyPatch, flags, cap, expected) -> None:
    monkeypatch.setattr(hw, "cpu_info", lambda: {"flags": flags, "machine": "x86_64"})
    monkeypatch.setattr(hw.platform, "machine", lambda: "x86_64")
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert hw.int8_class() == expected
    assert hw.int8_accumulates_in_int32() == (expected in ("amx", "vnni"))


def test_isa_cap_takes_half_precision_away(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert hw.half_precision_capped() == {"BF16", "FP16"}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert hw.half_precision_capped() == {"FP16"}
    # OpenVINO latches the cap when it starts: ask a fresh process
    code = "from quench.backend.openvino.loader import cpu_capabilities as c; print(sorted(c()))"
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **AVX2},
        timeout=60,
    )
    caps = json.loads(run.stdout.replace("'", '"'))
    assert "BF16" not in caps and "FP16" not in caps and "INT8" in caps


# -- portable weights -------------------------------------------------------------------------


def test_portable_weights_cannot_saturate_int16_pairs(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path, calib_dir: Path, cache_env: Path
) -> None:
    m = _int8(tmp_path, tiny_model, tiny_labels, calib_dir, "p", engine="onnxruntime")
    q = m.manifest["quantization"]
    assert q["target"] == "portable" and q["weight_bits"] == 7
    assert q["int8_exact_on"].startswith("every CPU")
    weights = _weights(m)
    assert weights and all(int(np.abs(w.astype(np.int32)).max()) <= 64 for w in weights)
    # the worst u8 x s8 pair sum of any two weights stays within int16
    assert max(255 * 2 * int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 32767


def test_native_target(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path, calib_dir: Path, cache_env: Path
) -> None:
    m = _int8(
        tmp_path, tiny_model, tiny_labels, calib_dir, "n", engine="onnxruntime", target="native"
    )
    q = m.manifest["quantization"]
    assert q["target"] == "native"
    if hw.int8_accumulates_in_int32():
        assert q["weight_bits"] == 8 and q["int8_exact_on"].startswith("VNNI/AMX")
        assert max(int(np.abs(w.astype(np.int32)).max()) for w in _weights(m)) > 64
    else:  # exact here only with 7 bits: native is portable
        assert q["weight_bits"] == 7 and q["int8_exact_on"].startswith("every CPU")


def test_unknown_target(tmp_path: Path, tiny_model: Path, tiny_labels: Path) -> None:
    from quench.errors import QuenchError

    with pytest.raises(QuenchError, match="unknown target 'fast'"):
        build(tiny_model, tmp_path / "x.quench", labels=str(tiny_labels), target="fast")


# -- the build's fidelity gate ---------------------------------------------------------------


def test_fidelity_gate_refuses_a_bad_build(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path, cache_env: Path
) -> None:
    # calibrating on flat grey images gives useless ranges; every fifth image of the list is
    # held out of calibration, and those are real images: the gate sees the damage
    from PIL import Image

    from quench.errors import QuenchError

    flat = tmp_path / "flat.png"
    Image.new("RGB", (40, 40), (128, 128, 128)).save(flat)
    lines = [
        str(make_image(tmp_path / f"r{i}.jpg", size=(44, 40 + i % 7), seed=500 + i))
        if i % 5 == 4
        else str(flat)
        for i in range(50)
    ]
    listing = tmp_path / "calib.txt"
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "bad.quench"
    logs: list[str] = []
    opts = dict(
        labels=str(tiny_labels),
        precision="qint8_mixed_float32",
        calib_images=str(listing),
        calib_count=40,
        **TINY_BUILD,
    )
    with pytest.raises(QuenchError, match=r"fidelity check failed: top-1 agreement .*not written"):
        build(tiny_model, out, log=logs.append, min_top1_agreement=0.95, **opts)
    assert not out.exists() and not list(tmp_path.glob(".bad.quench*"))
    assert any("fidelity on 10 held-out calibration images" in line for line in logs)
    # the same build with the bound lowered to zero is written, with its figures
    m = build(tiny_model, out, min_top1_agreement=0.0, **opts)
    f = m.manifest["fidelity"]
    assert f["images"] == 10 and f["passed"] and f["top1_agreement"] < 0.95
    assert f["sqnr_db"] < 10  # far from fp32
    assert m.manifest["build"]["min_top1_agreement"] == 0.0
    res = invoke(
        "build",
        tiny_model,
        "-o",
        tmp_path / "cli.quench",
        "--labels",
        tiny_labels,
        "--precision",
        "qint8_mixed_float32",
        "--calib-images",
        listing,
        "--calib-count",
        40,
        "--min-top1-agreement",
        0.95,
        "--preset",
        "imagenet",
        "--resize",
        36,
        "--crop",
        32,
        "--mean",
        "120,115,100",
        "--std",
        "60,60,60",
        "--engine",
        "onnxruntime",
        "-q",
    )
    assert res.exit_code == 1 and "fidelity check failed" in res.stderr
    assert "Try" in res.stderr and not (tmp_path / "cli.quench").exists()


def test_good_build_records_fidelity_and_selfcheck(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path, calib_dir: Path, cache_env: Path
) -> None:
    m = _int8(tmp_path, tiny_model, tiny_labels, calib_dir, "g")
    f = m.manifest["fidelity"]
    assert f["source"] == "held-out calibration images" and f["images"] == 4
    assert f["top1_agreement"] >= 0.8 and f["passed"]
    s = m.manifest["selfcheck"]
    assert s["images"] == 4 and s["build_host"]["engine"] == "openvino"
    assert s["bound"]["sqnr_db"] == pytest.approx(s["build_figures"]["sqnr_db"] - 3.0, abs=1e-3)
    held = set(m.manifest["quantization"]["calibration"]["files_skipped"])
    assert not held  # nothing unreadable
    res = invoke("info", tmp_path / "g.quench", "--json")
    assert json.loads(res.stdout)["fidelity"]["images"] == 4


def test_float_build_without_images_is_checked_on_random_input(tiny_artifact: Path) -> None:
    m = Model.load(tiny_artifact)
    assert m.manifest["fidelity"]["source"] == "random input"
    assert m.manifest["selfcheck"]["images"] == 8


# -- the self-check at load --------------------------------------------------------------------


def test_same_host_runs_nothing_other_host_runs_it(
    tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Model.load(tiny_artifact) as m:  # the host it was built on
        assert m.selfcheck is not None and not m.selfcheck.ran
    with Model.load(tiny_artifact, check="always") as m:
        assert m.selfcheck.ran and m.selfcheck.passed
        assert m.selfcheck.figures["top1_agreement"] == 1.0
    # another ISA cap (ONNX Runtime ignores it: the artifact still passes)
    if hw.onednn_isa_cap():
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    with Model.load(tiny_artifact) as m:
        assert m.selfcheck.ran and m.selfcheck.passed
        assert any("ONEDNN_MAX_CPU_ISA" in d for d in m.selfcheck.differences)


def _tampered(src: Path, dst: Path, reference: np.ndarray | None = None, data: bytes = b"") -> Path:
    """``src`` with other self-check reference outputs, checksums recomputed."""
    art = artifact.load(src)
    if reference is not None:
        buf = io.BytesIO()
        np.save(buf, reference)
        data = buf.getvalue()
    art.payloads[selfcheck.REFERENCE] = data
    art.manifest["selfcheck"]["build_host"]["engine_version"] = "0.0-other"
    artifact.save(art, dst)
    return dst


def test_failed_selfcheck_refuses_then_runs_with_the_flag(
    tmp_path: Path, tiny_artifact: Path, image_dir: Path
) -> None:
    ref = selfcheck._read_npy(artifact.load(tiny_artifact).payloads[selfcheck.REFERENCE], "r")
    bad = _tampered(tiny_artifact, tmp_path / "bad.quench", reference=ref[:, ::-1].copy())
    with pytest.raises(selfcheck.SelfCheckError, match=r"fails its self-check on this host"):
        Model.load(bad)
    with Model.load(bad, check="warn") as m:
        assert m.selfcheck.ran and not m.selfcheck.passed
    res = invoke("infer", bad, image_dir)
    assert res.exit_code == 1 and "fails its self-check" in res.stderr
    assert "0.0-other (build) vs" in res.stderr and "--accept-host-mismatch" in res.stderr
    res = invoke("infer", bad, image_dir, "--accept-host-mismatch")
    assert res.exit_code == 0, res.stderr
    assert "warning:" in res.stderr and "running anyway" in res.stderr
    res = invoke("verify", bad, "--json")
    assert res.exit_code == 1
    out = json.loads(res.stdout)
    assert out["ran"] and not out["passed"] and out["figures"]["top1_agreement"] < 1.0
    res = invoke("verify", tiny_artifact)
    assert res.exit_code == 0 and "passed" in res.stdout


def test_selfcheck_payload_must_be_numeric(tmp_path: Path, tiny_artifact: Path) -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bad = _tampered(tiny_artifact, tmp_path / "obj.quench", data=buf.getvalue())
    with pytest.raises(selfcheck.QuenchError, match=r"self-check payload .* unreadable"):
        Model.load(bad)


def test_verify_refuses_an_artifact_without_selfcheck(tmp_path: Path, tiny_artifact: Path) -> None:
    art = artifact.load(tiny_artifact)
    del art.manifest["selfcheck"]
    for name in (selfcheck.INPUTS, selfcheck.REFERENCE):
        del art.payloads[name]
    old = artifact.save(art, tmp_path / "old.quench")
    with Model.load(old) as m:  # older artifacts still load
        assert not m.selfcheck.ran
    res = invoke("verify", old)
    assert res.exit_code == 1 and "carries no self-check" in res.stderr


# -- the acceptance test: native refused on the AVX2 path, portable passes -------------------


def _verify_in(env: dict[str, str], art: Path) -> dict:
    """``quench verify --json`` in a fresh process (oneDNN reads its ISA cap at start)."""
    run = subprocess.run(
        [sys.executable, "-m", "quench", "verify", str(art), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert run.returncode in (0, 1), run.stderr
    return json.loads(run.stdout)


def make_dense(path: Path, size: int = 32, classes: int = NUM_CLASSES) -> Path:
    """Conv -> Relu -> Conv with all-positive weights -> Relu -> pool -> Gemm: dense positive
    activations times large weights, the case where u8 x s8 pairs overflow int16 on AVX2."""
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array((rng.uniform(0, 1, (16, 3, 3, 3)) * 0.2).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.uniform(0.5, 1, (16, 16, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal((classes, 16)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    x = helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["N", 3, size, size])
    y = helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", classes])
    model = helper.make_model(
        helper.make_graph(nodes, "dense", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 8
    onnx.save(model, path)
    return path


@needs_int32_accumulation
def test_native_artifact_refused_on_the_avx2_path_portable_passes(
    tmp_path: Path, tiny_labels: Path, calib_dir: Path, cache_env: Path
) -> None:
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        pytest.skip("already capped: the build host itself is on the AVX2 path")
    dense = make_dense(tmp_path / "dense.onnx")
    native = _int8(tmp_path, dense, tiny_labels, calib_dir, "native", target="native")
    portable = _int8(tmp_path, dense, tiny_labels, calib_dir, "portable")
    assert native.manifest["quantization"]["weight_bits"] == 8
    got = _verify_in(AVX2, tmp_path / "native.quench")
    assert got["ran"] and not got["passed"], got
    assert "ONEDNN_MAX_CPU_ISA unset (build) vs AVX2 (here)" in got["differences"]
    assert got["figures"]["sqnr_db"] < got["bound"]["sqnr_db"]
    ok = _verify_in(AVX2, tmp_path / "portable.quench")
    assert ok["ran"] and ok["passed"], ok
    built = portable.manifest["selfcheck"]["build_figures"]["sqnr_db"]
    assert ok["figures"]["sqnr_db"] == pytest.approx(built, abs=0.5)  # exact on both paths
    # loading the native artifact there is refused in one line
    run = subprocess.run(
        [sys.executable, "-m", "quench", "perf", str(tmp_path / "native.quench"), "--batch", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, **AVX2},
        timeout=120,
    )
    assert run.returncode == 1 and "fails its self-check" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
