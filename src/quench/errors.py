"""Errors Quench raises on bad input: one line that names the thing and the problem."""

from __future__ import annotations


class QuenchError(Exception):
    """A user-facing error. ``str(err)`` is a single line fit for the terminal."""


class ModelError(QuenchError):
    """The ONNX model is missing, invalid, or not a supported classifier."""


class ArtifactError(QuenchError):
    """A ``.quench`` artifact is truncated, corrupted, tampered with or of a newer format."""


class ImageError(QuenchError):
    """An image file is missing, unreadable, corrupt or too large."""


class FetchError(QuenchError):
    """A model download failed or produced a file that is not the expected model."""


class SignatureError(ArtifactError):
    """An artifact is unsigned, signed by an untrusted key, or its signature does not verify."""


class EngineError(QuenchError):
    """An inference engine (ONNX Runtime, OpenVINO) failed on a model: one line naming the
    node and the cause (:func:`quench.backend.failures.engine_errors`)."""
