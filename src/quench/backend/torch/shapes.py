"""The ONNX shape operators (reshaping, slicing, padding, indexing) as torch calls; makers as
in :mod:`.ops`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from onnx import numpy_helper

from quench.backend.torch.ops import Consts, Fn, Unsupported, scalar, static, torch_pad


def flatten(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    axis = a.get("axis", 1)

    def run(x: torch.Tensor) -> torch.Tensor:
        k = axis % x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:k]), -1)

    return run


def reshape(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    if opset < 5:
        raise Unsupported("it is a Reshape before opset 5")
    const = None if c[1] is None else [int(v) for v in c[1].tolist()]  # Python ints, once
    allow_zero = a.get("allowzero", 0)

    def run(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = const if const is not None else [int(v) for v in shape.tolist()]
        if not allow_zero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)

    return run


def transpose(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    perm = a.get("perm")
    return lambda x: x.permute(perm if perm is not None else list(reversed(range(x.dim()))))


def concat(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    axis = a["axis"]
    return lambda *xs: torch.cat(xs, axis)


def slice_(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    if opset < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = static(c, 1, "starts"), static(c, 2, "ends")
        axes, steps = static(c, 3, "axes"), static(c, 4, "steps")

    def run(x: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        for i, axis in enumerate(axes if axes is not None else range(len(starts))):
            step = steps[i] if steps else 1
            cut = slice(starts[i], ends[i], step)
            if step > 0:
                x = x[(slice(None),) * (axis % x.dim()) + (cut,)]
            else:  # torch slices step forward only: pick the indices Python's slice gives
                picked = range(*cut.indices(x.shape[axis]))
                x = x.index_select(axis, torch.tensor(picked, dtype=torch.int64, device=x.device))
        return x

    return run


def gather(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    axis = a.get("axis", 0)

    def run(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        k = axis % x.dim()
        idx = torch.where(idx < 0, idx + x.shape[k], idx).to(torch.int64)
        picked = x.index_select(k, idx.reshape(-1).to(x.device))
        return picked.reshape((*x.shape[:k], *idx.shape, *x.shape[k + 1 :]))

    return run


def squeeze(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    axes = a.get("axes") if opset < 13 else static(c, 1, "axes")
    if axes is None:
        return lambda x, *_: x.squeeze()
    return lambda x, *_: x.squeeze(tuple(axes))


def unsqueeze(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    axes = a.get("axes") if opset < 13 else static(c, 1, "axes")

    def run(x: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        rank = x.dim() + len(axes)
        for axis in sorted(ax % rank for ax in axes):
            x = x.unsqueeze(axis)
        return x

    return run


def shape(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    start, end = a.get("start", 0), a.get("end")
    return lambda x: torch.tensor(x.shape[start:end], dtype=torch.int64, device=x.device)


def pad(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    mode = a.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if opset < 11:
        pads, value, axes = a["pads"], a.get("value", 0.0), None
    else:
        pads, value = static(c, 1, "pads"), scalar(c, 2, "constant value") or 0.0
        axes = static(c, 3, "axes")
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}
    if mode not in modes:
        raise Unsupported(f"it has mode {mode!r}")

    def run(x: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        n = x.dim()
        which = [ax % n for ax in axes] if axes else list(range(n))
        begin, end = [0] * n, [0] * n
        for i, ax in enumerate(which):
            begin[ax], end[ax] = pads[i], pads[i + len(which)]
        flat = torch_pad(begin, end)
        while len(flat) > 2 and flat[-2:] == [0, 0]:  # F.pad pads the last axes only
            flat = flat[:-2]
        kind = modes[mode]
        return F.pad(x, flat, kind, value) if kind == "constant" else F.pad(x, flat, kind)

    return run


def constant_of_shape(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    value = a.get("value")
    fill = torch.from_numpy(numpy_helper.to_array(value).copy()) if value is not None else None
    dtype = torch.float32 if fill is None else fill.dtype
    number = 0.0 if fill is None else fill.reshape(-1)[0].item()

    def run(dims: torch.Tensor) -> torch.Tensor:
        size = [int(d) for d in dims.tolist()]
        return torch.full(size, number, dtype=dtype, device=dims.device)

    return run


def expand(a: dict[str, Any], c: Consts, opset: int) -> Fn:
    dims = static(c, 1, "shape")

    def run(x: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return x * torch.ones(dims, dtype=x.dtype, device=x.device)  # ONNX broadcasting

    return run


MAKERS: dict[str, Callable[[dict[str, Any], Consts, int], Fn]] = {
    "Flatten": flatten,
    "Reshape": reshape,
    "Transpose": transpose,
    "Concat": concat,
    "Slice": slice_,
    "Gather": gather,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Shape": shape,
    "Pad": pad,
    "ConstantOfShape": constant_of_shape,
    "Expand": expand,
}
