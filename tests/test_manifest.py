"""The typed manifest and precision: round trip, and one-line errors naming the field."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx.external_data_helper import set_external_data

from conftest import SIZE
from conftest import edited_manifest as _edited
from quench import artifact, precision
from quench.backend.onnxruntime.loader import OnnxRuntimeEngine
from quench.errors import ArtifactError, QuenchError
from quench.manifest import VOLATILE, Manifest
from quench.model import Model
from quench.precision import Precision


def test_round_trip_of_a_built_manifest(tiny_artifact: Path) -> None:
    d = artifact.load(tiny_artifact).manifest
    m = Manifest.from_dict(d)
    assert m.to_dict() == d
    assert m.precision.mode is precision.FORCE_FLOAT32
    assert m.precision.compute == "float32"
    assert m.io.input.shape == ("N", 3, SIZE, SIZE)
    assert m.batch.size is None and m.engine.name == "onnxruntime"


def test_volatile_fields_are_the_digest_skip_list() -> None:
    assert {
        "created",
        "build_seconds",
        "content_digest",
        "host",
        "verification",
        "timings",
        "engine_selection",
        "quantization",
    } == VOLATILE


def _pop(section: str, key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda m: m[section].pop(key)


@pytest.mark.parametrize(
    ("edit", "field", "phrase"),
    [
        (lambda m: m.pop("labels"), "labels", "missing"),
        (lambda m: m.update(labels=m["labels"][:-1]), "labels", "expected 10 labels"),
        (lambda m: m.update(labels=[1, 2]), "labels", "list of strings"),
        (_pop("preprocess", "mean"), "preprocess.mean", "missing"),
        (lambda m: m["preprocess"].update(mean=[1, 2]), "preprocess.mean", "3 numbers"),
        (lambda m: m["preprocess"].update(std="60"), "preprocess.std", "3 positive numbers"),
        (lambda m: m["preprocess"].update(crop="32"), "preprocess.crop", "integer"),
        (lambda m: m["preprocess"].update(layout="CHW"), "preprocess.layout", "NCHW"),
        (lambda m: m.update(batch={"policy": "fixed", "size": -2}), "batch.size", ">= 1"),
        (lambda m: m["batch"].update(policy="static"), "batch.policy", "fixed, dynamic"),
        (lambda m: m["io"]["input"].update(name=7), "io.input.name", "non-empty string"),
        (lambda m: m["io"]["input"].update(shape=["N", 3, 8, 8]), "io.input.shape", "crop"),
        (lambda m: m["engine"].update(name="tensorrt"), "engine.name", "onnxruntime"),
        (lambda m: m["precision"].update(mode="int4"), "precision.mode", "unknown precision"),
        (lambda m: m.pop("io"), "io", "missing"),
        (lambda m: m.update(fidelity=[]), "fidelity", "expected an object"),
    ],
)
def test_edited_manifest_gives_one_line_naming_the_field(
    tmp_path: Path, tiny_artifact: Path, edit, field: str, phrase: str
) -> None:
    bad = _edited(tiny_artifact, tmp_path / "edited.quench", edit)
    with pytest.raises(ArtifactError) as exc:
        Model.load(bad)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{bad}: manifest field '{field}': "), msg
    assert phrase in msg, msg


@pytest.mark.parametrize("which", ["input", "output"])
def test_wrong_tensor_name(tmp_path: Path, tiny_artifact: Path, which: str) -> None:
    bad = _edited(
        tiny_artifact, tmp_path / "names.quench", lambda m: m["io"][which].update(name="nope")
    )
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    with Model.load(bad, check="off") as m, pytest.raises(ArtifactError) as exc:
        m.predict(x)
    msg = str(exc.value)
    assert f"manifest field 'io.{which}.name': 'nope' is not a tensor" in msg
    assert str(bad) in msg and "\n" not in msg


def test_precision_is_defined_once() -> None:
    assert precision.NAMES == (
        "force_float32",
        "force_float16",
        "force_bfloat16",
        "qint8_mixed_float16",
        "qint8_mixed_float32",
    )
    assert [p.name for p in precision.ALL if p.is_int8] == [
        "qint8_mixed_float16",
        "qint8_mixed_float32",
    ]
    assert Precision.parse("force_bfloat16").needs == {"BF16"}
    assert Precision.parse(precision.FORCE_FLOAT16) is precision.FORCE_FLOAT16
    assert [p.family for p in precision.ALL] == ["float32", "half", "half", "int8", "int8"]
    with pytest.raises(
        QuenchError, match=r"^unknown precision 'int8'; choose one of force_float32"
    ):
        Precision.parse("int8")
    engine = OnnxRuntimeEngine()
    assert [p.name for p in precision.ALL if engine.supports(p.name)] == [
        "force_float32",
        "qint8_mixed_float32",
    ]
    assert not engine.supports("int4")


def _with_payload(src: Path, dst: Path, name: str, data: bytes) -> Path:
    """``src`` with one payload replaced and every checksum recomputed (a consistent file)."""

    def edit(m: dict[str, Any]) -> None:
        m["payloads"][name] = hashlib.sha256(data).hexdigest()

    _edited(src, dst, edit)
    with zipfile.ZipFile(dst) as zin:
        members = {i.filename: zin.read(i.filename) for i in zin.infolist()}
    members[f"payload/{name}"] = data
    with zipfile.ZipFile(dst, "w") as zout:
        for member, body in members.items():
            zout.writestr(member, body)
    return dst


def _one_line(exc: pytest.ExceptionInfo[BaseException], path: Path, *phrases: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    for phrase in phrases:
        assert phrase in msg, msg
    return msg


@pytest.mark.parametrize(
    ("edit", "field", "phrase"),
    [
        (lambda m: m["selfcheck"].update(build_host=[1]), "selfcheck.build_host", "object"),
        (lambda m: m["selfcheck"].update(build_figures=[]), "selfcheck.build_figures", "object"),
        (
            lambda m: m["selfcheck"]["bound"].update(top1_agreement="x"),
            "selfcheck.bound.top1_agreement",
            "expected a number",
        ),
        (lambda m: m.update(payloads=[]), "payloads", "expected name -> sha256"),
    ],
)
def test_selfcheck_section_is_checked(
    tmp_path: Path, tiny_artifact: Path, edit, field: str, phrase: str
) -> None:
    bad = _edited(tiny_artifact, tmp_path / "sc.quench", edit)
    with pytest.raises(ArtifactError) as exc:
        Model.load(bad, check="always")
    _one_line(exc, bad, f"manifest field '{field}'", phrase)


def test_output_classes_must_match_the_payload(tmp_path: Path, tiny_artifact: Path) -> None:
    """Fewer classes in the manifest than the engine outputs: an IndexError on labels before."""

    def edit(m: dict[str, Any]) -> None:
        m["io"]["output"]["shape"] = ["N", 5]
        m["labels"] = m["labels"][:5]

    bad = _edited(tiny_artifact, tmp_path / "classes.quench", edit)
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    with Model.load(bad, check="off") as m, pytest.raises(ArtifactError) as exc:
        m.predict(x)
    _one_line(exc, bad, "manifest field 'io.output.shape': ['N', 5] does not match", "['N', 10]")


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        ({"graph_optimization_level": "bogus"}, "KeyError: 'bogus'"),
        ({"zzz": 1}, "unexpected keyword argument 'zzz'"),
    ],
)
def test_engine_options_that_do_not_load(
    tmp_path: Path, tiny_artifact: Path, options: dict[str, Any], phrase: str
) -> None:
    bad = _edited(
        tiny_artifact, tmp_path / "o.quench", lambda m: m["engine"].update(options=options)
    )
    with pytest.raises(ArtifactError) as exc:
        Model.load(bad, check="always")
    _one_line(exc, bad, "onnxruntime payload does not load", "'engine.options'", phrase)


def test_unloadable_onnxruntime_payload(tmp_path: Path, tiny_artifact: Path) -> None:
    bad = _with_payload(tiny_artifact, tmp_path / "garbage.quench", "model.onnx", b"garbage")
    with pytest.raises(ArtifactError) as exc:
        Model.load(bad, check="always")
    _one_line(exc, bad, "payload model.onnx: not an ONNX model")
    # valid protobuf, not a model ONNX Runtime can run
    empty = onnx.ModelProto(ir_version=8).SerializeToString()
    bad = _with_payload(tiny_artifact, tmp_path / "empty.quench", "model.onnx", empty)
    with pytest.raises(ArtifactError) as exc:
        Model.load(bad, check="always")
    _one_line(exc, bad, "the onnxruntime payload does not load")


def test_selfcheck_reference_of_the_wrong_shape(tmp_path: Path, tiny_artifact: Path) -> None:
    ref = io.BytesIO()
    np.save(ref, np.zeros((3, 4), np.float32))
    bad = _with_payload(
        tiny_artifact, tmp_path / "ref.quench", "selfcheck/reference.npy", ref.getvalue()
    )
    with pytest.raises(QuenchError) as exc:
        Model.load(bad, check="always")
    _one_line(exc, bad, "reference.npy has shape (3, 4), expected (8, 10)")


@pytest.mark.parametrize("location", ["secret.bin", "sub/../secret.bin"])
def test_payload_with_external_data_is_refused(
    tmp_path: Path, tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch, location: str
) -> None:
    """An initializer pointing to a file beside the working directory: loading it would read
    that file as weights (and a served model could leak it)."""
    payload = artifact.load(tiny_artifact).payloads["model.onnx"]
    model = onnx.load_from_string(payload)
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    secret = tensor.raw_data
    set_external_data(tensor, location=location)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "secret.bin").write_bytes(secret)  # the weights, so it would load and run
    bad = _with_payload(
        tiny_artifact, tmp_path / "ext.quench", "model.onnx", model.SerializeToString()
    )
    with pytest.raises(ArtifactError) as exc:
        Model.load(bad, check="always")
    _one_line(
        exc, bad, f"tensor '{tensor.name}' refers to external data '{location}'", "self-contained"
    )
