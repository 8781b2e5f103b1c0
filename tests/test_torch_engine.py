"""The torch-cuda engine: its refusals, --engine auto without a GPU, what it records for the
manifest; and, marked ``gpu`` (skipped where torch sees no CUDA GPU), the engine on a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")

from quench.backend import get_engine  # noqa: E402
from quench.backend.base import CompileSpec  # noqa: E402
from quench.backend.onnxruntime.session import session  # noqa: E402
from quench.backend.torch import loader  # noqa: E402
from quench.builder.engines import candidate_engines  # noqa: E402
from quench.errors import QuenchError  # noqa: E402
from quench.precision import NAMES  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch sees no CUDA GPU here")
no_cuda = pytest.mark.skipif(CUDA, reason="this host has a CUDA GPU")


def spec(precision: str = "force_float16", **options: object) -> CompileSpec:
    return CompileSpec(precision, "images", "logits", None, options=dict(options))


@pytest.mark.parametrize("precision", ["qint8_mixed_float16", "qint8_mixed_float32"])
def test_int8_is_refused_in_one_line(precision: str, tiny_model: Path) -> None:
    engine = get_engine("torch-cuda")
    assert not engine.supports(precision)
    why = engine.refusal(precision)
    assert why == "engine torch-cuda has no INT8 kernels (torch has no INT8 convolution on CUDA)"
    with pytest.raises(QuenchError) as err:
        candidate_engines("torch-cuda", precision)
    assert str(err.value) == why
    with pytest.raises(QuenchError, match="no INT8 kernels"):
        engine.compile(onnx.load(str(tiny_model)), spec(precision))


@no_cuda
def test_without_a_gpu_it_is_refused_and_auto_leaves_it_out() -> None:
    engine = get_engine("torch-cuda")
    for precision in ("force_float32", "force_float16", "force_bfloat16"):
        assert not engine.supports(precision)
        assert "needs a CUDA GPU" in (engine.refusal(precision) or "")
        try:
            names = [e.name for e in candidate_engines("auto", precision)]
        except QuenchError:  # no CPU engine runs it here either (bf16 without AVX512-BF16)
            names = []
        assert "torch-cuda" not in names
    assert candidate_engines("auto", "force_float32")  # the CPU engines still run fp32
    with pytest.raises(QuenchError, match=r"^engine torch-cuda needs a CUDA GPU; torch \S+ sees"):
        candidate_engines("torch-cuda", "force_float32")


@no_cuda
def test_runner_on_a_host_without_cuda_fails_in_one_line(tiny_model: Path) -> None:
    from quench.errors import EngineError

    runner = get_engine("torch-cuda").runner(
        {"model.onnx": tiny_model.read_bytes()}, {"device": "cuda", "float_type": "float16"}
    )
    with pytest.raises(EngineError, match=r"^torch-cuda: no CUDA GPU visible to torch"):
        runner.activate()


@pytest.mark.parametrize(
    ("precision", "tf32", "computes"),
    [
        ("force_float32", False, "float32 (TF32 off)"),
        ("force_float32", True, "float32 (TF32 tensor cores for Conv/MatMul)"),
        ("force_float16", False, "float16 (weights and activations), float32 outputs"),
        ("force_bfloat16", False, "bfloat16 (weights and activations), float32 outputs"),
    ],
)
def test_compile_records_what_computes(
    precision: str, tf32: bool, computes: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The payload is the ONNX model; the options and info the manifest gets name the float
    type, TF32 and the versions (a GPU's name, driver and CUDA where one is present)."""
    monkeypatch.setattr(loader, "has_cuda", lambda: True)
    model = onnx.load(str(tiny_model))
    compiled = get_engine("torch-cuda").compile(model, spec(precision, tf32=tf32))
    assert onnx.ModelProto.FromString(compiled.payloads["model.onnx"]) == model
    assert compiled.options["float_type"] == precision.removeprefix("force_")
    assert compiled.options["tf32"] is tf32 and compiled.options["device"] == "cuda"
    info = compiled.info
    assert info["computes"] == computes and info["torch"] == torch.__version__
    assert info["layout"] == "channels-last" and "256" in info["graphs"]
    if CUDA:
        assert {"gpu", "driver", "cuda", "cudnn"} <= set(info)


def test_compile_refuses_an_untranslatable_model_at_build_time(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "has_cuda", lambda: True)
    model = onnx.load(str(tiny_model))
    model.graph.node[2].op_type = "Celu"
    with pytest.raises(QuenchError, match=r"^model: Celu node .* no translation"):
        get_engine("torch-cuda").compile(model, spec())


def test_self_check_host_key_holds_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU artifact loaded on another GPU (or CUDA / cuDNN build) differs from its build
    host, so its self-check runs there; CPU engines' host keys are unchanged."""
    from quench.selfcheck import differences, host_key

    assert "device" not in host_key("onnxruntime", "1")
    h200 = {"device": "cuda", "torch": "2", "gpu": "NVIDIA H200", "compute_capability": "9.0",
            "cuda": "13.0", "cudnn": 91000, "driver": "580"}  # fmt: skip
    monkeypatch.setattr(loader, "describe", lambda device: h200)
    built = host_key("torch-cuda", "2")
    assert built["device"] == {"gpu": "NVIDIA H200", "compute_capability": "9.0",
                               "cuda": "13.0", "cudnn": 91000}  # fmt: skip
    assert differences(built, built) == []
    monkeypatch.setattr(loader, "describe", lambda device: {**h200, "gpu": "NVIDIA L4"})
    (diff,) = differences(built, host_key("torch-cuda", "2"))
    assert diff.startswith("device {") and "NVIDIA H200" in diff and "NVIDIA L4" in diff


def test_every_float_mode_is_a_runner_float_type() -> None:
    from quench.backend.torch.runner import FLOAT_TYPES
    from quench.precision import Precision

    for name in NAMES:
        mode = Precision.parse(name)
        if not mode.is_int8:
            assert mode.float_type in FLOAT_TYPES


# -- on a CUDA GPU --------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("float_type", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_runner_matches_onnxruntime(float_type: str, compiled: bool, tiny_model: Path) -> None:
    data = tiny_model.read_bytes()
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    want = session(data, optimization="disable").run(None, {"images": x})[0]
    with get_engine("torch-cuda").runner(
        {"model.onnx": data}, {"float_type": float_type, "compile": compiled}
    ) as run:
        got = run.infer({"images": x})["logits"]
        again = run.infer({"images": x})["logits"]  # a CUDA graph's replay
        if compiled:
            assert set(run.compile_seconds) == {8}
    tol = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 8e-2}[float_type]
    scale = float(np.max(np.abs(want)))
    assert np.max(np.abs(got - want)) < tol * max(1.0, scale)
    np.testing.assert_array_equal(got, again)


@gpu
@needs_cuda
def test_gpu_build_load_and_self_check(tiny_model: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from quench.cli import app

    out = tmp_path / "m.quench"
    result = CliRunner().invoke(
        app,
        ["build", str(tiny_model), "-o", str(out), "--engine", "torch-cuda",
         "--precision", "force_float16"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    info = CliRunner().invoke(app, ["info", str(out)])
    assert "torch-cuda" in info.output and "float16" in info.output
