"""ONNX Runtime runner (CPU execution provider)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from quench.backend.base import InferFn, Runner, TensorMeta
from quench.backend.onnxruntime.session import session as new_session
from quench.hw import default_threads

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

    def concurrent(self, n: int) -> list[InferFn]:
        """ONNX Runtime sessions may be run from several threads at once."""
        self.session  # noqa: B018 - fails when not active
        return [self.infer] * n

    def _meta(self, args: list) -> list[TensorMeta]:
        return [TensorMeta(a.name, _DTYPES.get(a.type, a.type), tuple(a.shape)) for a in args]

    def inputs(self) -> list[TensorMeta]:
        return self._meta(self.session.get_inputs())

    def outputs(self) -> list[TensorMeta]:
        return self._meta(self.session.get_outputs())
