"""One served model, LitServe-style: ``setup`` / ``decode`` / ``predict`` / ``encode``.

``predict`` runs on the model's engine thread (called by the batcher with a whole batch);
``decode_*`` and ``encode_*`` run per request, off the event loop, and speak the KServe v2 /
Open Inference Protocol: JSON tensors and the binary tensor data extension.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from quench.errors import ImageError
from quench.imaging import Normalizer, load_pixels
from quench.model import Model, topk_of
from quench.serve.errors import ServeError
from quench.serve.schema import InferenceRequest, RequestInput, describe

HEADER_LENGTH = "Inference-Header-Content-Length"
VERSION = "1"


def bad(message: str) -> ServeError:
    return ServeError(400, message)


@dataclass
class InferRequest:
    x: np.ndarray
    id: str | None = None
    binary_output: bool = False  # the (only) output as binary tensor data


def finite_or_none(values: np.ndarray) -> list[float | None]:
    """Numbers for JSON: NaN and +-inf (not JSON) become ``null``."""
    out = values.ravel().tolist()
    if np.isfinite(values).all():
        return out
    return [v if math.isfinite(v) else None for v in out]


# the v2 protocol's datatype of each engine input, with its little-endian NumPy form
DATATYPES = {"float32": ("FP32", "<f4"), "uint8": ("UINT8", "u1")}


class ClassifierAPI:
    """A ``Model`` behind the v2 protocol: one input (N, *shape), FP32 tensors or, for a
    ``--input uint8`` artifact, UINT8 pixels (N, H, W, 3) RGB; one FP32 output (N, C)."""

    def __init__(
        self, model: Model, name: str | None = None, max_pixels: int | None = None
    ) -> None:
        self.model = model
        self.name = name or model.name
        self.max_pixels = max_pixels  # decoded pixels per image on /classify
        self.input_shape = tuple(model.data.input_shape)
        self.dtype = np.dtype(model.data.input_dtype)
        self.datatype, self._wire = DATATYPES[model.data.input_dtype]
        self.classes = len(model.labels)
        self._norm = Normalizer(model.data)

    # -- setup / predict (engine thread) ----------------------------------------------------
    def setup(self) -> None:
        """Activate the engine and run one warm-up batch."""
        self.predict(np.zeros((1, *self.input_shape), self.dtype))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.run_batch(np.ascontiguousarray(x, dtype=self.dtype))

    def max_batch(self, configured: int) -> int:
        fixed = self.model.fixed_batch
        return min(configured, fixed) if fixed else configured

    # -- metadata ---------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": f"quench_{self.model.engine}",
            "inputs": [
                {
                    "name": self.model.input_name,
                    "datatype": self.datatype,
                    "shape": [-1, *self.input_shape],
                }
            ],
            "outputs": [
                {"name": self.model.output_name, "datatype": "FP32", "shape": [-1, self.classes]}
            ],
            # the artifact's self-check, run on this host at start (see quench.selfcheck)
            "quench": {
                "selfcheck": self.model.selfcheck.to_dict() if self.model.selfcheck else None,
                "fidelity": self.model.manifest.get("fidelity"),
            },
        }

    # -- infer: decode / encode -------------------------------------------------------------
    def decode_infer(self, body: bytes | memoryview, header_length: str | None) -> InferRequest:
        """A v2 inference request (JSON, or JSON header + binary tensors) -> input tensor."""
        binary: bytes | memoryview = b""
        if header_length is not None:
            try:
                hlen = int(header_length)
            except ValueError:
                raise bad(f"{HEADER_LENGTH} is not an integer: {header_length!r}") from None
            if not 0 <= hlen <= len(body):
                raise bad(f"{HEADER_LENGTH} {hlen} is outside the body ({len(body)} bytes)")
            # the small JSON header is copied out, the tensor bytes are not
            body, binary = bytes(memoryview(body)[:hlen]), memoryview(body)[hlen:]
        try:
            req = InferenceRequest.model_validate_json(body)
        except ValidationError as exc:
            raise bad(describe(exc)) from None
        if len(req.inputs) != 1:
            raise bad(f"expected 'inputs' with exactly one tensor ({self.model.input_name!r})")
        x = self._decode_tensor(req.inputs[0], binary)
        binary_output = bool(req.parameters and req.parameters.binary_data_output)
        for out in req.outputs or []:
            self.check_output(out.name)
            if out.parameters and out.parameters.binary_data is not None:
                binary_output = out.parameters.binary_data
        return InferRequest(x, None if req.id is None else str(req.id), binary_output)

    def _decode_tensor(self, t: RequestInput, binary: bytes | memoryview) -> np.ndarray:
        self.check_input(t.name, t.datatype, t.shape)
        size = t.parameters.binary_data_size if t.parameters else None
        if size is not None:
            want = math.prod(t.shape) * self.dtype.itemsize
            if size != want:
                raise bad(
                    f"input {t.name!r}: binary_data_size {size} != {want} for shape {t.shape}"
                )
            if len(binary) < size:
                raise bad(f"input {t.name!r}: {len(binary)} binary bytes, expected {size}")
            return self.from_raw(t.shape, memoryview(binary)[:size])
        if t.data is None:
            raise bad(f"input {t.name!r}: no 'data' and no binary_data_size")
        return self.from_values(t.name, t.shape, t.data)

    # -- tensors (shared by the HTTP and gRPC protocols) -----------------------------------
    def check_input(self, name: str, datatype: str, shape: list[int]) -> None:
        """The one input's name, datatype and shape [N, *input_shape], N >= 1, else 400."""
        if name != self.model.input_name:
            raise bad(
                f"unknown input {name!r}; model {self.name!r} takes {self.model.input_name!r}"
            )
        if datatype != self.datatype:
            raise bad(
                f"input {name!r}: datatype {datatype!r} is not supported, send {self.datatype}"
                + (" pixels (built with --input uint8)" if self.datatype == "UINT8" else "")
            )
        if (
            len(shape) != len(self.input_shape) + 1
            or tuple(shape[1:]) != self.input_shape
            or shape[0] < 1
        ):
            want = ", ".join(map(str, self.input_shape))
            raise bad(f"input {name!r}: shape {list(shape)} does not match [N, {want}] with N >= 1")

    def check_output(self, name: str) -> None:
        if name != self.model.output_name:
            raise bad(
                f"unknown output {name!r}; model {self.name!r} has {self.model.output_name!r}"
            )

    def from_raw(self, shape: list[int], raw: bytes | memoryview) -> np.ndarray:
        """Raw little-endian tensor bytes of exactly ``shape`` (checked) -> a view, no copy."""
        return np.frombuffer(raw, dtype=self._wire).reshape(shape)

    def from_values(self, name: str, shape: list[int], values: Any) -> np.ndarray:
        """Numbers (flat or nested; None -> NaN) of ``shape`` -> the input tensor, else 400."""
        try:
            x = np.asarray(values, dtype=np.float32)  # null -> NaN
        except (ValueError, TypeError, OverflowError):
            raise bad(
                f"input {name!r}: 'data' must be a flat or evenly nested list of numbers"
            ) from None
        count = math.prod(shape)
        if x.size != count:
            raise bad(f"input {name!r}: {x.size} values for shape {list(shape)} ({count})")
        if self.datatype == "UINT8":
            if not np.all((x >= 0) & (x <= 255) & (x == np.round(x))):  # NaN fails too
                raise bad(f"input {name!r}: UINT8 'data' must be integers 0..255")
            x = x.astype(np.uint8)
        return x.reshape(shape)

    def encode_infer(self, req: InferRequest, y: np.ndarray) -> tuple[bytes, dict[str, str]]:
        """Response body and headers (binary: JSON header + raw little-endian FP32)."""
        y = np.ascontiguousarray(y, dtype="<f4")
        resp: dict[str, Any] = {"model_name": self.name, "model_version": VERSION}
        if req.id is not None:
            resp["id"] = req.id
        out: dict[str, Any] = {
            "name": self.model.output_name,
            "datatype": "FP32",
            "shape": list(y.shape),
        }
        resp["outputs"] = [out]
        if req.binary_output:
            raw = y.tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            header = json.dumps(resp).encode()
            return header + raw, {
                HEADER_LENGTH: str(len(header)),
                "Content-Type": "application/octet-stream",
            }
        out["data"] = finite_or_none(y)
        return json.dumps(resp, allow_nan=False).encode(), {"Content-Type": "application/json"}

    # -- classify: decode / encode ----------------------------------------------------------
    def decode_image(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> model input (1, *shape); ImageError -> 400.

        Decoded at reduced scale where the model's input allows, and at most ``max_pixels``.
        """
        try:
            pixels = load_pixels(data, self.model.data, max_pixels=self.max_pixels, reduce=True)
        except ImageError as exc:
            raise bad(str(exc).replace("<bytes>", "image")) from None
        out = self._norm.new_batch(1)
        self._norm(pixels, out[0])
        return out

    def encode_classify(self, y: np.ndarray, topk: int) -> dict[str, Any]:
        idx, val = topk_of(self.model.scores(y[:1]), topk)
        return {
            "model": self.name,
            "top": [
                {"class": int(c), "name": self.model.labels[int(c)], "score": s}
                for c, s in zip(idx[0], finite_or_none(val[0]), strict=True)
            ],
        }
