"""Synthetic-weight replicas of model-zoo classifiers, for speed measurement only.

The graphs match the official ONNX model-zoo files node for node (same operators, attributes,
shapes, tensor names, opset and IR version); only the weight values are made up. They let the
benchmarks run without a download, and are useless for classifying anything.

Weights are drawn from ``numpy.random.default_rng(seed)``: He-normal convolutions, BatchNorm
gamma/beta around 1/0. The BatchNorm running statistics are then *calibrated*: one pass of a
small batch of N(0, 1) images through ONNX Runtime with every BatchNormalization fed the batch
statistics of its input, which become its running mean/var. The classifier bias is centred the
same way, so activations stay in a sane range through all layers and the logits depend on the
input (the argmax is not the same class for every image).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quench import graph
from quench.backend.onnxruntime.session import session
from quench.errors import QuenchError
from quench.hw import one_blas_thread

__all__ = ["SYNTH", "count_macs", "count_params", "synth", "synth_resnet50_v1"]

_DOC = (
    "Synthetic-weights replica of the ONNX model zoo resnet50-v1-7.onnx (MXNet/Gluon ResNet-50 "
    "v1): same graph, random weights with calibrated BatchNorm statistics. For speed "
    "measurement only; its predictions are meaningless."
)

_PRE = "resnetv17_"
_EPS = 1e-5
_MOMENTUM = 0.9
_BLOCKS = (3, 4, 6, 3)
_WIDTHS = (64, 128, 256, 512)
_EXPANSION = 4
_CLASSES = 1000
_IMAGE = 224
_CALIB_BATCH = 2
_LOGIT_STD = 2.0  # target std of the logits over classes, on N(0, 1) input
_MIN_VAR = 1e-4  # floor for calibrated running variances


class _ResNetV1Builder:
    """Emits the Gluon ResNet-50 v1 graph in MXNet-exporter style, drawing weights from ``rng``."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.params: dict[str, np.ndarray] = {}  # insertion order = graph input order

    def _normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def conv(
        self, name: str, x: str, cin: int, cout: int, k: int, stride: int, pad: int, bias: bool
    ) -> str:
        """Conv k x k (He-normal, fan_out), with an optional small bias."""
        w = f"{name}_weight"
        self.params[w] = self._normal((cout, cin, k, k), np.sqrt(2.0 / (cout * k * k)))
        inputs = [x, w]
        if bias:
            self.params[f"{name}_bias"] = self._normal((cout,), 0.01)
            inputs.append(f"{name}_bias")
        out = f"{name}_fwd"
        self.nodes.append(
            helper.make_node(
                "Conv",
                inputs,
                [out],
                name=out,
                dilations=[1, 1],
                group=1,
                kernel_shape=[k, k],
                pads=[pad] * 4,
                strides=[stride, stride],
            )
        )
        return out

    def bn(self, name: str, x: str, c: int, gamma: tuple[float, float] = (0.5, 1.5)) -> str:
        """BatchNormalization; running mean/var are placeholders until calibrated."""
        names = [f"{name}_{p}" for p in ("gamma", "beta", "running_mean", "running_var")]
        self.params[names[0]] = self.rng.uniform(*gamma, size=c).astype(np.float32)
        self.params[names[1]] = self._normal((c,), 0.1)
        self.params[names[2]] = np.zeros(c, np.float32)
        self.params[names[3]] = np.ones(c, np.float32)
        out = f"{name}_fwd"
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [x, *names],
                [out],
                name=out,
                epsilon=_EPS,
                momentum=_MOMENTUM,
            )
        )
        return out

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        """Any parameter-free node whose output tensor is named like the node."""
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def bottleneck(
        self, pre: str, idx: tuple[int, int, int], x: str, cin: int, width: int, stride: int
    ) -> str:
        """Bottleneck v1: the stride sits on the first 1x1 conv (and on the projection)."""
        b, ci, ri = idx  # block index within the stage, first conv index, first relu index
        cout = width * _EXPANSION
        y = self.conv(f"{pre}conv{ci}", x, cin, width, 1, stride, 0, bias=True)
        y = self.bn(f"{pre}batchnorm{ci}", y, width)
        y = self.op("Relu", [y], f"{pre}relu{ri}_fwd")
        y = self.conv(f"{pre}conv{ci + 1}", y, width, width, 3, 1, 1, bias=False)
        y = self.bn(f"{pre}batchnorm{ci + 1}", y, width)
        y = self.op("Relu", [y], f"{pre}relu{ri + 1}_fwd")
        y = self.conv(f"{pre}conv{ci + 2}", y, width, cout, 1, 1, 0, bias=True)
        # Small last gamma, in the spirit of zero-init-residual: the shortcut dominates.
        y = self.bn(f"{pre}batchnorm{ci + 2}", y, cout, gamma=(0.1, 0.4))
        shortcut = x
        if b == 0:
            shortcut = self.conv(f"{pre}conv{ci + 3}", x, cin, cout, 1, stride, 0, bias=False)
            shortcut = self.bn(f"{pre}batchnorm{ci + 3}", shortcut, cout)
        y = self.op("Add", [y, shortcut], f"{pre}_plus{b}")
        return self.op("Relu", [y], f"{pre}activation{b}")

    def build(self) -> tuple[str, str]:
        """Emit the whole network; return the names of the pooled features and the logits."""
        x = self.conv(f"{_PRE}conv0", "data", 3, 64, 7, 2, 3, bias=False)
        x = self.op("Relu", [self.bn(f"{_PRE}batchnorm0", x, 64)], f"{_PRE}relu0_fwd")
        x = self.op(
            "MaxPool", [x], f"{_PRE}pool0_fwd", kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]
        )
        cin = 64
        for stage, (blocks, width) in enumerate(zip(_BLOCKS, _WIDTHS, strict=True), start=1):
            pre = f"{_PRE}stage{stage}_"
            ci = 0
            for b in range(blocks):
                stride = 2 if stage > 1 and b == 0 else 1
                x = self.bottleneck(pre, (b, ci, 2 * b), x, cin, width, stride)
                ci += 4 if b == 0 else 3
                cin = width * _EXPANSION
        x = self.op("GlobalAveragePool", [x], f"{_PRE}pool1_fwd")
        feats = self.op("Flatten", [x], "flatten_473", axis=1)
        # Unit-variance placeholder; rescaled and centred by calibration.
        self.params[f"{_PRE}dense0_weight"] = self._normal((_CLASSES, cin), 1.0)
        self.params[f"{_PRE}dense0_bias"] = np.zeros(_CLASSES, np.float32)
        logits = self.op(
            "Gemm",
            [feats, f"{_PRE}dense0_weight", f"{_PRE}dense0_bias"],
            f"{_PRE}dense0_fwd",
            alpha=1.0,
            beta=1.0,
            transA=0,
            transB=1,
        )
        return feats, logits


def _make_model(
    nodes: list[onnx.NodeProto],
    params: dict[str, np.ndarray],
    outputs: list[onnx.ValueInfoProto],
    batch: int | str,
) -> onnx.ModelProto:
    """An IR-3 / opset-7 model; as IR 3 requires, every initializer is also a graph input."""
    data = helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, _IMAGE, _IMAGE])
    weights = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape) for n, a in params.items()
    ]
    graph = helper.make_graph(
        nodes,
        "mxnet_converted_model",
        [data, *weights],
        outputs,
        initializer=[numpy_helper.from_array(a, n) for n, a in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 3
    return model


def _calibrate(
    nodes: list[onnx.NodeProto], params: dict[str, np.ndarray], feats: str, seed: int
) -> None:
    """Set BN running stats to batch stats of N(0,1) images; centre and scale the classifier."""
    calib: list[onnx.NodeProto] = []
    stats: list[tuple[str, str, str, str]] = []  # (mean param, var param, mean out, var out)
    axes = [0, 2, 3]
    for node in nodes:
        if node.op_type != "BatchNormalization":
            calib.append(node)
            continue
        x, y = node.input[0], node.output[0]
        m4, m, v = f"{y}__m4", f"{y}__mean", f"{y}__var"
        calib += [
            helper.make_node("ReduceMean", [x], [m4], axes=axes, keepdims=1),
            helper.make_node("Squeeze", [m4], [m], axes=axes),
            helper.make_node("Sub", [x, m4], [f"{y}__d"]),
            helper.make_node("Mul", [f"{y}__d", f"{y}__d"], [f"{y}__d2"]),
            helper.make_node("ReduceMean", [f"{y}__d2"], [v], axes=axes, keepdims=0),
            helper.make_node(
                "BatchNormalization",
                [x, node.input[1], node.input[2], m, v],
                [y],
                epsilon=_EPS,
                momentum=_MOMENTUM,
            ),
        ]
        stats.append((node.input[3], node.input[4], m, v))
    fetch = [feats] + [name for *_, m, v in stats for name in (m, v)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in fetch]
    model = _make_model(calib, params, outputs, _CALIB_BATCH)

    sess = session(model, threads=1, inter_threads=1)
    images = np.random.default_rng([seed, 1]).standard_normal(
        (_CALIB_BATCH, 3, _IMAGE, _IMAGE), dtype=np.float32
    )
    got = dict(zip(fetch, sess.run(fetch, {"data": images}), strict=True))
    del sess, model

    for mean_param, var_param, m, v in stats:
        params[mean_param] = got[m].astype(np.float32)
        params[var_param] = np.maximum(got[v], _MIN_VAR).astype(np.float32)

    f = got[feats].astype(np.float64)
    mu = f.mean(axis=0)
    rms = float(np.sqrt(np.mean((f - mu) ** 2)))
    if not np.isfinite(rms) or rms <= 0.0:
        raise QuenchError("synthetic model calibration produced degenerate features")
    w_name, b_name = f"{_PRE}dense0_weight", f"{_PRE}dense0_bias"
    w = params[w_name] * np.float32(_LOGIT_STD / (rms * np.sqrt(f.shape[1])))
    params[w_name] = w
    params[b_name] = (-(w.astype(np.float64) @ mu)).astype(np.float32)


def _save_atomic(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Write ``model`` to a temp file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def synth_resnet50_v1(
    path: str | os.PathLike[str] | None = None, *, seed: int = 0
) -> onnx.ModelProto:
    """ResNet-50 v1 shaped exactly like the zoo's ``resnet50-v1-7.onnx``, synthetic weights.

    Deterministic: the same ``seed`` gives the same serialized bytes. When ``path`` is given the
    model is also saved there atomically.
    """
    builder = _ResNetV1Builder(np.random.default_rng(seed))
    feats, logits = builder.build()
    with one_blas_thread():  # see quench.hw.one_blas_thread
        _calibrate(builder.nodes, builder.params, feats, seed)
    out = helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", _CLASSES])
    model = _make_model(builder.nodes, builder.params, [out], "N")
    model.producer_name = "quench-synth"
    model.doc_string = _DOC
    if path is not None:
        _save_atomic(model, path)
    return model


SYNTH: dict[str, Callable[..., onnx.ModelProto]] = {"resnet50-v1-7": synth_resnet50_v1}


def synth(name: str, path: str | os.PathLike[str] | None = None, seed: int = 0) -> onnx.ModelProto:
    """Generate the synthetic replica of zoo model ``name`` (saved to ``path`` if given)."""
    try:
        make = SYNTH[name]
    except KeyError:
        known = ", ".join(sorted(SYNTH))
        raise QuenchError(f"no synthetic model named {name!r}; known: {known}") from None
    return make(path, seed=seed)


def count_params(model: onnx.ModelProto) -> int:
    """Number of learnable parameters: all initializers except BatchNorm running mean/var."""
    buffers = {
        n.input[i]
        for n in model.graph.node
        if n.op_type == "BatchNormalization"
        for i in (3, 4)
        if i < len(n.input)
    }
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name not in buffers)


def count_macs(model: onnx.ModelProto, image_size: int = 224) -> int:
    """Multiply-accumulates of the Conv, Gemm and MatMul nodes for one image."""
    return graph.count_macs(model, (3, image_size, image_size))
