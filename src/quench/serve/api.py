"""One served model, LitServe-style: ``setup`` / ``decode`` / ``predict`` / ``encode``.

``predict`` runs on the model's engine thread (called by the batcher with a whole batch);
``decode_*`` and ``encode_*`` run per request, off the event loop, and speak the KServe v2 /
Open Inference Protocol: JSON tensors and the binary tensor data extension.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quench.errors import ImageError
from quench.imaging import Normalizer, load_pixels
from quench.model import Model, topk_of
from quench.serve.errors import ServeError

HEADER_LENGTH = "Inference-Header-Content-Length"
VERSION = "1"


def bad(message: str) -> ServeError:
    return ServeError(400, message)


@dataclass
class InferRequest:
    x: np.ndarray
    id: str | None = None
    binary_output: bool = False  # the (only) output as binary tensor data
    parameters: dict[str, Any] = field(default_factory=dict)


def _flag(params: Any, key: str) -> bool:
    return isinstance(params, dict) and bool(params.get(key, False))


class ClassifierAPI:
    """A ``Model`` behind the v2 protocol: one FP32 input (N, *shape), one FP32 output (N, C)."""

    def __init__(self, model: Model, name: str | None = None) -> None:
        self.model = model
        self.name = name or model.name
        self.input_shape = tuple(model.data.input_shape)
        self.classes = len(model.labels)
        self._norm = Normalizer(model.data)

    # -- setup / predict (engine thread) ----------------------------------------------------
    def setup(self) -> None:
        """Activate the engine and run one warm-up batch."""
        self.predict(np.zeros((1, *self.input_shape), np.float32))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.run_batch(np.ascontiguousarray(x, dtype=np.float32))

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
                    "datatype": "FP32",
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
    def decode_infer(self, body: bytes, header_length: str | None) -> InferRequest:
        """A v2 inference request (JSON, or JSON header + binary tensors) -> input tensor."""
        binary = b""
        if header_length is not None:
            try:
                hlen = int(header_length)
            except ValueError:
                raise bad(f"{HEADER_LENGTH} is not an integer: {header_length!r}") from None
            if not 0 <= hlen <= len(body):
                raise bad(f"{HEADER_LENGTH} {hlen} is outside the body ({len(body)} bytes)")
            body, binary = body[:hlen], body[hlen:]
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"request body is not valid JSON ({exc})") from None
        if not isinstance(req, dict):
            raise bad("request body must be a JSON object")
        inputs = req.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise bad(f"expected 'inputs' with exactly one tensor ({self.model.input_name!r})")
        x = self._decode_tensor(inputs[0], binary)
        params = req.get("parameters") or {}
        binary_output = _flag(params, "binary_data_output")
        outputs = req.get("outputs")
        if outputs is not None:
            if not isinstance(outputs, list):
                raise bad("'outputs' must be a list")
            for out in outputs:
                if not isinstance(out, dict) or out.get("name") != self.model.output_name:
                    got = out.get("name") if isinstance(out, dict) else out
                    raise bad(
                        f"unknown output {got!r}; model {self.name!r} has "
                        f"{self.model.output_name!r}"
                    )
                if "binary_data" in (out.get("parameters") or {}):
                    binary_output = _flag(out.get("parameters"), "binary_data")
        rid = req.get("id")
        return InferRequest(x, None if rid is None else str(rid), binary_output, params)

    def _decode_tensor(self, t: dict[str, Any], binary: bytes) -> np.ndarray:
        name, dtype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if name != self.model.input_name:
            raise bad(
                f"unknown input {name!r}; model {self.name!r} takes {self.model.input_name!r}"
            )
        if dtype != "FP32":
            raise bad(f"input {name!r}: datatype {dtype!r} is not supported, send FP32")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or len(shape) != len(self.input_shape) + 1
            or tuple(shape[1:]) != self.input_shape
            or shape[0] < 1
        ):
            want = ", ".join(map(str, self.input_shape))
            raise bad(f"input {name!r}: shape {shape} does not match [N, {want}] with N >= 1")
        count = int(np.prod(shape))
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if size != count * 4:
                raise bad(
                    f"input {name!r}: binary_data_size {size} != {count * 4} for shape {shape}"
                )
            if len(binary) < size:
                raise bad(f"input {name!r}: {len(binary)} binary bytes, expected {size}")
            return np.frombuffer(binary[:size], dtype="<f4").reshape(shape)
        if "data" not in t:
            raise bad(f"input {name!r}: no 'data' and no binary_data_size")
        try:
            x = np.asarray(t["data"], dtype=np.float32)
        except (ValueError, TypeError):
            raise bad(f"input {name!r}: 'data' must be numbers") from None
        if x.size != count:
            raise bad(f"input {name!r}: {x.size} values for shape {shape} ({count})")
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
        out["data"] = y.ravel().tolist()
        return json.dumps(resp).encode(), {"Content-Type": "application/json"}

    # -- classify: decode / encode ----------------------------------------------------------
    def decode_image(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> model input (1, *shape); ImageError -> 400."""
        try:
            pixels = load_pixels(data, self.model.data)
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
                {"class": int(c), "name": self.model.labels[int(c)], "score": float(s)}
                for c, s in zip(idx[0], val[0], strict=True)
            ],
        }
