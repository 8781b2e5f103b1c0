"""ONNX operators as torch calls (:mod:`.shapes` has the shape operators): one maker each.

A maker gets the node's attributes, the values of its inputs that are constants (``None`` for
the others) and the opset, and returns the function the module calls with the node's inputs
at run time. Arguments ONNX passes as tensors but torch needs as Python values (shapes, axes,
pads, slice bounds) are read from the constants here, once; a maker raises
:class:`Unsupported` (one line) for a form it does not translate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Fn = Callable[..., Any]
Consts = Sequence[torch.Tensor | None]


class Unsupported(Exception):
    """This node's form has no translation (the message says why)."""


class Floats:
    """The float type one module computes in: its Casts to a float type cast to it."""

    def __init__(self) -> None:
        self.dtype = torch.float32


DTYPES = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


def static(consts: Consts, i: int, what: str) -> list[int] | None:
    """Input ``i`` as a list of ints (``None`` where the node has no such input)."""
    if i >= len(consts):
        return None
    value = consts[i]
    if value is None:
        raise Unsupported(f"its {what} is computed at run time (only constant {what} translate)")
    if not value.numel():  # an optional input left out ("")
        return None
    return [int(v) for v in value.reshape(-1).tolist()]


def scalar(consts: Consts, i: int, what: str) -> float | None:
    if i >= len(consts):
        return None
    value = consts[i]
    if value is None:
        raise Unsupported(f"its {what} is computed at run time")
    return float(value.reshape(-1)[0]) if value.numel() else None


# -- elementwise ------------------------------------------------------------------------------


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates


def _variadic(fn: Fn) -> Fn:
    def run(*xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out

    return run


UNARY: dict[str, Fn] = {
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Softplus": F.softplus,
    "HardSwish": F.hardswish,
    "Identity": lambda x: x,
    "Dropout": lambda x, *_: x,  # inference: the identity (a used mask output is refused)
}
BINARY: dict[str, Fn] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _div,
    "Pow": torch.pow,
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "MatMul": torch.matmul,
}


def leaky_relu(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    alpha = a.get("alpha", 0.01)
    return lambda x: F.leaky_relu(x, alpha)


def elu(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    alpha = a.get("alpha", 1.0)
    return lambda x: F.elu(x, alpha)


def hard_sigmoid(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)


def gelu(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    approximate = a.get("approximate", "none")
    return lambda x: F.gelu(x, approximate=approximate)


def clip(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    if opset < 11:
        lo, hi = a.get("min", -math.inf), a.get("max", math.inf)
    else:
        lo, hi = scalar(c, 1, "minimum"), scalar(c, 2, "maximum")
    return lambda x, *_: torch.clamp(x, lo, hi)


def cast(a: dict[str, Any], c: Consts, opset: int, floats: Floats | None = None) -> Fn:
    to = DTYPES.get(a["to"])
    if to is None:
        raise Unsupported(f"casts to ONNX type {a['to']}")
    if to.is_floating_point and floats is not None:  # to the module's float type
        return lambda x: x.to(floats.dtype)
    return lambda x: x.to(to)


# -- convolution, normalisation, pooling ---------------------------------------------------


def _pads(a: dict[str, Any], nd: int) -> tuple[list[int], list[int]]:
    pads = list(a.get("pads", [0] * 2 * nd))
    return pads[:nd], pads[nd:]


def _same(
    x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], dil: Sequence[int], upper: bool
) -> tuple[list[int], list[int]]:
    """``auto_pad`` SAME_UPPER / SAME_LOWER pads for ``x``'s spatial size."""
    begin, end = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dil, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begin.append(small if upper else total - small)
        end.append(total - small if upper else small)
    return begin, end


def torch_pad(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX begin/end pads (first axis first) as ``F.pad``'s list (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        out += [b, e]
    return out


def _padder(
    a: dict[str, Any],
    nd: int,
    kernel: Sequence[int] | None,
    strides: Sequence[int],
    dil: Sequence[int],
) -> Callable[[torch.Tensor], tuple[list[int], list[int]]]:
    auto = a.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        upper = auto == "SAME_UPPER"
        return lambda x, k=None: _same(x, kernel or k, strides, dil, upper)
    if auto == "VALID":
        return lambda x, k=None: ([0] * nd, [0] * nd)
    begin, end = _pads(a, nd)
    return lambda x, k=None: (begin, end)


def conv(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    w = c[1] if len(c) > 1 else None
    kernel = a.get("kernel_shape") or (list(w.shape[2:]) if w is not None else None)
    if kernel is None:
        raise Unsupported("its weights are computed at run time and it has no kernel_shape")
    nd = len(kernel)
    if nd not in (1, 2, 3):
        raise Unsupported(f"it is a {nd}-D convolution")
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    strides, dil = a.get("strides", [1] * nd), a.get("dilations", [1] * nd)
    group = a.get("group", 1)
    pads = _padder(a, nd, kernel, strides, dil)

    def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        begin, end = pads(x)
        if begin != end:
            x, begin = F.pad(x, torch_pad(begin, end)), [0] * nd
        return fn(x, w, b, strides, begin, dil, group)

    return run


def batch_norm(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    if opset < 9 and a.get("spatial", 1) != 1:
        raise Unsupported("it has spatial=0 (per-activation statistics)")
    if a.get("training_mode", 0):
        raise Unsupported("it is in training mode")
    eps = a.get("epsilon", 1e-5)

    def run(
        x: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
    ) -> torch.Tensor:
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)

    return run


def lrn(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    size = a["size"]
    if size % 2 == 0:  # ONNX and torch place an even window differently
        raise Unsupported(f"its window size {size} is even")
    alpha, beta, bias = a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)
    return lambda x: F.local_response_norm(x, size, alpha, beta, bias)


def _pool_common(a: dict[str, Any]) -> tuple[list[int], int, list[int], list[int], Callable]:
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    if nd not in (1, 2, 3):
        raise Unsupported(f"it is a {nd}-D pool")
    strides, dil = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    return kernel, nd, strides, dil, _padder(a, nd, kernel, strides, dil)


def max_pool(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    kernel, nd, strides, dil, pads = _pool_common(a)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    ceil = bool(a.get("ceil_mode", 0))

    def run(x: torch.Tensor) -> torch.Tensor:
        begin, end = pads(x)
        if begin != end or any(2 * p > k for p, k in zip(begin, kernel, strict=True)):
            x, begin = F.pad(x, torch_pad(begin, end), value=-math.inf), [0] * nd
        return fn(x, kernel, strides, begin, dil, ceil_mode=ceil)

    return run


def average_pool(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    kernel, nd, strides, dil, pads = _pool_common(a)
    if any(d != 1 for d in dil):
        raise Unsupported("it has dilations")
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    ceil, include = bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0))
    begin, end = _pads(a, nd)
    if a.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET") and begin != end and not include:
        raise Unsupported("it has asymmetric pads without count_include_pad")

    def run(x: torch.Tensor) -> torch.Tensor:
        begin, end = pads(x)
        if begin != end or any(2 * p > k for p, k in zip(begin, kernel, strict=True)):
            if not include and any(begin + end):
                raise RuntimeError("asymmetric pads without count_include_pad do not translate")
            x, begin = F.pad(x, torch_pad(begin, end)), [0] * nd
        return fn(x, kernel, strides, begin, ceil, include)

    return run


def global_average_pool(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def global_max_pool(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    return lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# -- linear algebra, softmax, reductions ------------------------------------------------------


def gemm(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    ta, tb = a.get("transA", 0), a.get("transB", 0)
    if tb and not ta and alpha == 1.0 and beta == 1.0:
        return lambda x, w, b=None: F.linear(x, w, b)

    def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        y = (x.t() if ta else x) @ (w.t() if tb else w)
        y = y * alpha if alpha != 1.0 else y
        return y if b is None else y + (b * beta if beta != 1.0 else b)

    return run


def softmax(a: dict[str, Any], c: Consts, opset: int, log: bool = False) -> Fn:
    fn = torch.log_softmax if log else torch.softmax
    if opset >= 13:
        axis = a.get("axis", -1)
        return lambda x: fn(x, axis)
    axis = a.get("axis", 1)  # before opset 13: over all axes from ``axis`` on, as one

    def run(x: torch.Tensor) -> torch.Tensor:
        k = axis % x.dim()
        return fn(x.flatten(k), k).reshape(x.shape) if k < x.dim() - 1 else fn(x, k)

    return run


def log_softmax(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    return softmax(a, c, opset, log=True)


def _reduce(fn: Callable, axes_input_from: int) -> Callable[..., Fn]:
    def make(a: dict[str, Any], c: Consts, opset: int) -> Fn:
        axes = a.get("axes") if opset < axes_input_from else static(c, 1, "axes")
        keep = bool(a.get("keepdims", 1))
        if not axes and a.get("noop_with_empty_axes", 0):
            return lambda x, *_: x
        return lambda x, *_: fn(x, dim=tuple(axes) if axes else tuple(range(x.dim())), keepdim=keep)

    return make


def _simple(fn: Fn) -> Callable[..., Fn]:
    return lambda a, c, opset: fn


MAKERS: dict[str, Callable[[dict[str, Any], Consts, int], Fn]] = {
    **{op: _simple(fn) for op, fn in {**UNARY, **BINARY}.items()},
    "LeakyRelu": leaky_relu,
    "Elu": elu,
    "HardSigmoid": hard_sigmoid,
    "Gelu": gelu,
    "Clip": clip,
    "Cast": cast,
    "Conv": conv,
    "BatchNormalization": batch_norm,
    "LRN": lrn,
    "MaxPool": max_pool,
    "AveragePool": average_pool,
    "GlobalAveragePool": global_average_pool,
    "GlobalMaxPool": global_max_pool,
    "Gemm": gemm,
    "Softmax": softmax,
    "LogSoftmax": log_softmax,
    "ReduceMean": _reduce(torch.mean, 18),
    "ReduceSum": _reduce(torch.sum, 13),
    "ReduceMax": _reduce(torch.amax, 18),
}
