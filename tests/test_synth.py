"""The synthetic ResNet-50 v1 replica: structure, size, numerics, determinism, saving."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from quench.errors import QuenchError
from quench.zoo.synth import SYNTH, count_macs, count_params, synth, synth_resnet50_v1

NAME = "resnet50-v1-7"


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return synth_resnet50_v1(seed=0)


@pytest.fixture(scope="module")
def model_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


@pytest.fixture(scope="module")
def session(model_bytes: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def _attr(node: onnx.NodeProto, name: str) -> list[int]:
    return list(next(a.ints for a in node.attribute if a.name == name))


def test_op_counts(model: onnx.ModelProto) -> None:
    # 1 stem conv + 16 blocks x 3 + 4 projections; relus: stem + 16 x (2 body + 1 after Add).
    assert Counter(n.op_type for n in model.graph.node) == {
        "Conv": 53,
        "BatchNormalization": 53,
        "Relu": 49,
        "Add": 16,
        "MaxPool": 1,
        "GlobalAveragePool": 1,
        "Flatten": 1,
        "Gemm": 1,
    }


def test_bn_is_not_folded(model: onnx.ModelProto) -> None:
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "BatchNormalization":
            assert producer[n.input[0]].op_type == "Conv"
            assert {a.name for a in n.attribute} == {"epsilon", "momentum"}


def test_stride_sits_on_first_1x1_conv(model: onnx.ModelProto) -> None:
    nodes = {n.name: n for n in model.graph.node}
    for stage in (1, 2, 3, 4):
        s = 1 if stage == 1 else 2
        pre = f"resnetv17_stage{stage}_"
        first, mid, proj = (nodes[f"{pre}conv{i}_fwd"] for i in (0, 1, 3))
        assert _attr(first, "kernel_shape") == [1, 1]
        assert _attr(first, "strides") == [s, s]
        assert _attr(mid, "kernel_shape") == [3, 3]
        assert _attr(mid, "strides") == [1, 1]
        assert _attr(mid, "pads") == [1, 1, 1, 1]
        assert _attr(proj, "kernel_shape") == [1, 1]
        assert _attr(proj, "strides") == [s, s]
    stem = nodes["resnetv17_conv0_fwd"]
    assert (_attr(stem, "kernel_shape"), _attr(stem, "strides")) == ([7, 7], [2, 2])
    pool = nodes["resnetv17_pool0_fwd"]
    assert (_attr(pool, "kernel_shape"), _attr(pool, "strides")) == ([3, 3], [2, 2])


def test_io_opset_and_checker(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model)
    assert model.ir_version == 3
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 7)]
    assert model.producer_name == "quench-synth"
    assert "speed" in model.doc_string
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    assert [i.name for i in inputs] == ["data"]
    (out,) = model.graph.output
    assert out.name == "resnetv17_dense0_fwd"
    dims = [(d.dim_param, d.dim_value) for d in inputs[0].type.tensor_type.shape.dim]
    assert dims == [("N", 0), ("", 3), ("", 224), ("", 224)]
    dims = [(d.dim_param, d.dim_value) for d in out.type.tensor_type.shape.dim]
    assert dims == [("N", 0), ("", 1000)]
    for vi in (inputs[0], out):
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer)


def test_size(model: onnx.ModelProto) -> None:
    assert abs(count_params(model) - 25_557_032) / 25_557_032 < 0.01
    assert 3.8e9 <= count_macs(model) <= 4.2e9


@pytest.mark.parametrize("batch", [1, 3])
def test_runs_with_sane_outputs(session: ort.InferenceSession, batch: int) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    (y,) = session.run(None, {"data": x})
    assert y.shape == (batch, 1000)
    assert np.isfinite(y).all()
    std = y.std(axis=1)
    assert ((std > 0.1) & (std < 100)).all()
    if batch > 1:
        assert len(set(y.argmax(axis=1).tolist())) > 1
        assert not np.allclose(y[0], y[1])


def test_deterministic_and_saved_atomically(model_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "m.onnx"
    synth(NAME, path, seed=0)
    assert path.read_bytes() == model_bytes
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"]
    assert synth_resnet50_v1(seed=1).SerializeToString() != model_bytes


def test_unknown_name() -> None:
    assert NAME in SYNTH
    with pytest.raises(QuenchError, match=NAME) as err:
        synth("resnet9000", None)
    assert "\n" not in str(err.value)
