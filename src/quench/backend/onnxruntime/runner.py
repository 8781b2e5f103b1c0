"""ONNX Runtime runner (CPU execution provider)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from quench.backend.base import InferFn, LayerTime, Runner, TensorMeta
from quench.backend.onnxruntime.session import session as new_session
from quench.errors import QuenchError
from quench.hw import default_threads

_ORT_PRECISION = {"float": "f32", "float16": "f16", "uint8": "u8", "int8": "i8", "int32": "i32"}
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8"}


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(
        self,
        model: bytes,
        threads: int | None = None,
        graph_optimization_level: str = "all",
    ) -> None:
        super().__init__()
        self._model = model
        self.threads = threads or default_threads()
        self._level = graph_optimization_level
        self._session: ort.InferenceSession | None = None

    def _activate(self) -> None:
        # one inter-op thread: ONNX Runtime's default sequential execution, nodes one at a time
        self._session = new_session(
            self._model, threads=self.threads, inter_threads=1, optimization=self._level
        )

    def _deactivate(self) -> None:
        self._session = None

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            raise RuntimeError("runner is not active: call activate() first")
        return self._session

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed), strict=True))

    def concurrent(self, n: int, streams: int | None = None) -> list[InferFn]:
        """ONNX Runtime sessions may be run from several threads at once (it has no streams:
        every call shares the session's thread pool)."""
        self.session  # noqa: B018 - fails when not active
        if streams is not None:
            raise QuenchError("ONNX Runtime has no streams: use --requests N for N calls in flight")
        return [self.infer] * n

    def profile(self, feed: dict[str, np.ndarray], iterations: int) -> list[LayerTime]:
        """ONNX Runtime's profiler (``enable_profiling``) on a separate session: its node
        events, ``iterations`` runs after one warm-up. The precision is the node's first input
        type (an int8 kernel reads uint8/int8)."""
        with tempfile.TemporaryDirectory(prefix="quench-profile-") as tmp:
            sess = new_session(
                self._model,
                threads=self.threads,
                inter_threads=1,
                optimization=self._level,
                profile_prefix=str(Path(tmp) / "ort"),
            )
            names = [o.name for o in sess.get_outputs()]
            sess.run(names, feed)
            for _ in range(iterations):
                sess.run(names, feed)
            events = json.loads(Path(sess.end_profiling()).read_text())
        out: list[LayerTime] = []
        warm = True
        for ev in events:
            if ev.get("cat") == "Session" and ev.get("name") == "model_run":
                if warm:  # the warm-up run's events came before its model_run event
                    warm = False
                    out.clear()
                continue
            if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
                continue
            args = ev.get("args", {})
            types = [next(iter(t)) for t in args.get("input_type_shape", []) if t]
            out.append(
                LayerTime(
                    ev["name"].removesuffix("_kernel_time"),
                    args.get("op_name", "?"),
                    _ORT_PRECISION.get(types[0], types[0]) if types else "?",
                    ev.get("dur", 0) / 1e3,
                    args.get("provider", ""),
                )
            )
        return out

    def _meta(self, args: list) -> list[TensorMeta]:
        return [TensorMeta(a.name, _DTYPES.get(a.type, a.type), tuple(a.shape)) for a in args]

    def inputs(self) -> list[TensorMeta]:
        return self._meta(self.session.get_inputs())

    def outputs(self) -> list[TensorMeta]:
        return self._meta(self.session.get_outputs())
