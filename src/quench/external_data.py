"""ONNX tensors whose data lives in other files: found, and refused in artifact payloads.

An artifact is one self-contained file: a payload whose tensor points to ``location:
secret.bin`` (or any path) would make the engine read that file as weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain

import onnx
from onnx import TensorProto

from quench.errors import ArtifactError


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``graph``: initializers, sparse ones, attribute tensors, and
    those of subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for a in node.attribute:
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        for sparse in [
            *([a.sparse_tensor] if a.HasField("sparse_tensor") else []),
            *a.sparse_tensors,
        ]:
            yield from (sparse.values, sparse.indices)
        for g in [*([a.g] if a.HasField("g") else []), *a.graphs]:
            yield from _tensors(g)


def external_data(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(tensor name, file)`` for every tensor whose data lives outside the model file."""
    tensors = chain(
        _tensors(model.graph),
        (t for f in model.functions for n in f.node for t in _attribute_tensors(n)),
    )
    return [
        (t.name, next((e.value for e in t.external_data if e.key == "location"), "?"))
        for t in tensors
        if t.data_location == TensorProto.EXTERNAL
    ]


def refuse_external_data(data: bytes, where: str) -> None:
    """Refuse an ONNX payload that refers to data in other files (an artifact is one file:
    such a reference could read any file the loading process can)."""
    try:
        model = onnx.ModelProto.FromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise ArtifactError(f"{where}: not an ONNX model ({type(exc).__name__})") from None
    refs = external_data(model)
    if refs:
        name, location = refs[0]
        raise ArtifactError(
            f"{where}: tensor {name!r} refers to external data {location!r} "
            f"({len(refs)} such tensor(s)); artifacts must be self-contained: rebuild it"
        )
