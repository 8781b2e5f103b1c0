"""Engine failures as one line: ONNX Runtime's and OpenVINO's exceptions become
:class:`~quench.errors.EngineError` naming the node and the cause, never a traceback."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from quench.errors import EngineError, QuenchError

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_NODE = re.compile(r"while running (\w+) node\. Name:'([^']*)' Status Message: (.*)", re.S)
_OV_SOURCE = re.compile(r"Exception from \S+:\d+:\s*")


def is_engine_failure(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by ONNX Runtime or OpenVINO (not by Quench itself)."""
    module = type(exc).__module__ or ""
    if module.startswith(("onnxruntime", "openvino")):
        return True
    return isinstance(exc, RuntimeError) and "Exception from src" in str(exc)


def one_line(exc: BaseException) -> str:
    """The engine's message without its source paths and C++ signatures, on one line."""
    text = str(exc).strip()
    text = _ORT_PREFIX.sub("", text)
    if m := _ORT_NODE.search(text):
        op, name, cause = m.groups()
        if " was false. " in cause:  # "file.h:91 Class::fn(args) condition was false. Why"
            cause = cause.split(" was false. ", 1)[1]
        elif cause.startswith("/"):
            cause = cause.split(" ", 1)[-1]
        text = f"{op} node {name!r}: {cause}"
    text = _OV_SOURCE.sub("", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines)[:600] or type(exc).__name__


@contextmanager
def engine_errors(what: str = "") -> Iterator[None]:
    """Turn an engine's exception inside the block into :class:`EngineError` (``what`` first)."""
    try:
        yield
    except QuenchError:
        raise
    except Exception as exc:
        if not is_engine_failure(exc):
            raise
        raise EngineError(f"{what}{': ' if what else ''}{one_line(exc)}") from None
