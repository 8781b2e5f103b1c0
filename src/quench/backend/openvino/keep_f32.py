"""Layers kept in fp32 under a bf16 or f16 inference precision, marked in the IR itself.

OpenVINO's CPU plugin keeps a node in its original precision (``keepOrigPrecision``: left out
of ``EnforceInferencePrecision``) when the node carries the ``DisablePrecisionConversion``
runtime attribute for f16, the attribute ``ov.save_model`` itself writes into IR for
precision-sensitive nodes (``<attribute name="DisablePrecisionConversion" version="0"
value="dynamic:f16"/>``). The Python API cannot create that typed attribute on a node (a
string set through ``get_rt_info()`` is ignored), but the IR reader does from the XML, so the
mark is written into the IR's XML (ElementTree) and travels in the artifact: every host that
loads it compiles those layers in fp32. The compiled model's runtime graph confirms it.

An ONNX node is found in the IR by its name (``N``, or ``N/WithoutBiases`` for a Conv/Gemm whose
bias Add is ``N``) or by the tensor names of its outputs.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence

import onnx

from quench.errors import QuenchError

ATTRIBUTE = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16"}
_SUFFIXES = ("", "/WithoutBiases")
_PASSIVE = frozenset({"Const", "Parameter", "Result"})
_HEAVY = frozenset(
    {"Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul", "FullyConnected"}
)
# what the CPU plugin fuses into a Convolution/FullyConnected as post-ops
_ELEMENTWISE = frozenset(
    {"Add", "Multiply", "Subtract", "Clamp", "Relu", "ReLU", "PRelu", "Swish", "HSwish", "HSigmoid",
     "Sigmoid", "Elu", "Gelu", "Mish", "Maximum", "Minimum", "Tanh", "Exp"}
)  # fmt: skip


def outputs_of(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, list[str]]:
    """ONNX node name -> the tensor names its IR layers may carry: its outputs, and those of a
    BatchNormalization it alone feeds (OpenVINO folds that into the convolution, whose own
    output name is then gone)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    out = {}
    wanted = set(names)
    for n in model.graph.node:
        if n.name not in wanted:
            continue
        tensors, tail = list(n.output), n
        while len(tail.output) == 1 and len(readers.get(tail.output[0], [])) == 1:
            tail = readers[tail.output[0]][0]
            if tail.op_type != "BatchNormalization":
                break
            tensors += list(tail.output)
        out[n.name] = tensors
    return out


def locatable(xml: bytes, layers: dict[str, list[str]]) -> set[str]:
    """The nodes of ``layers`` that have an IR layer in ``xml``."""
    root = ET.fromstring(xml)
    return {
        hit
        for layer in root.iter("layer")
        if layer.get("type") not in _PASSIVE and (hit := _node_of(layer, layers)) is not None
    }


def mark(xml: bytes, layers: dict[str, list[str]]) -> bytes:
    """The IR ``xml`` with the layers of ONNX nodes ``layers`` (node name -> output tensor
    names) kept in fp32: the IR layer named after the node (or ``NAME/WithoutBiases``) or
    producing one of its tensors, the heavy layer behind it (a Conv/Gemm's bias Add names the
    node), and the element-wise layers it feeds (bias, activation, residual Add: the CPU plugin
    fuses them into the layer, and a bf16 post-op fused into an fp32 layer fails to run). A node
    with no layer is an error (one line)."""
    if not layers:
        return xml
    root = ET.fromstring(xml)
    by_id = {layer.get("id"): layer for layer in root.iter("layer")}
    producers: dict[str | None, list[str | None]] = {}
    readers: dict[str | None, list[str | None]] = {}
    for edge in root.iter("edge"):
        readers.setdefault(edge.get("from-layer"), []).append(edge.get("to-layer"))
        producers.setdefault(edge.get("to-layer"), []).append(edge.get("from-layer"))
    found: set[str] = set()
    todo = []
    for lid, layer in by_id.items():
        if layer.get("type") in _PASSIVE:
            continue
        hit = _node_of(layer, layers)
        if hit is not None:
            found.add(hit)
            todo.append(lid)
            todo += _heavy_behind(lid, by_id, producers)
    missing = [n for n in layers if n not in found]
    if missing:
        raise QuenchError(
            f"no OpenVINO layer for {', '.join(missing[:5])} (keep-in-fp32 layers must be ONNX "
            "node names of the model)"
        )
    done: set[str | None] = set()
    while todo:
        lid = todo.pop()
        if lid in done:
            continue
        done.add(lid)
        _set(by_id[lid])
        todo += [r for r in readers.get(lid, []) if by_id[r].get("type") in _ELEMENTWISE]
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _node_of(layer: ET.Element, layers: dict[str, list[str]]) -> str | None:
    """The ONNX node (of ``layers``) this IR layer belongs to, if any."""
    name = layer.get("name", "")
    tensors = {t for port in layer.iter("port") for t in (port.get("names") or "").split(",") if t}
    for node, outputs in layers.items():
        if name in (node, f"{node}/WithoutBiases") or tensors & set(outputs):
            return node
    return None


def _heavy_behind(
    lid: str | None, by_id: dict[str | None, ET.Element], producers: dict[str | None, list]
) -> list[str | None]:
    """The heavy layer a node's element-wise tail (bias Add) is computed from."""
    if by_id[lid].get("type") not in _ELEMENTWISE:
        return []
    found, todo, seen = [], list(producers.get(lid, [])), set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        kind = by_id[p].get("type")
        if kind in _HEAVY:
            found.append(p)
        elif kind in _ELEMENTWISE:
            todo += producers.get(p, [])
    return found[:1]


def _set(layer: ET.Element) -> None:
    rt = layer.find("rt_info")
    if rt is None:
        rt = ET.Element("rt_info")
        layer.insert(_rt_position(layer), rt)
    if not any(a.get("name") == ATTRIBUTE["name"] for a in rt.iter("attribute")):
        ET.SubElement(rt, "attribute", ATTRIBUTE)


def _rt_position(layer: ET.Element) -> int:
    """Where ``ov.save_model`` puts ``rt_info``: after ``data``, before the ports."""
    for i, child in enumerate(layer):
        if child.tag in ("input", "output"):
            return i
    return len(layer)


def marked(xml: bytes) -> list[str]:
    """The IR layers kept in fp32 (for tests and the manifest)."""
    root = ET.fromstring(xml)
    return [
        layer.get("name", "")
        for layer in root.iter("layer")
        if any(a.get("name") == ATTRIBUTE["name"] for a in layer.iter("attribute"))
        and layer.get("type") != "Const"
    ]
