"""Precision modes: one typed value per ``--precision`` name, defined once.

Every place that needs to know what a mode means (int8 or not, the float type its float layers
compute in, how weights are stored, what the CPU must offer) asks a :class:`Precision` instead
of parsing the name.
"""

from __future__ import annotations

from dataclasses import dataclass

from quench.errors import QuenchError

FLOAT_TYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Precision:
    """One precision mode."""

    name: str  # the --precision name, e.g. "qint8_mixed_float16"
    is_int8: bool  # int8 Conv/Gemm (a QDQ-quantized model), float layers around them
    float_type: str  # what the float layers are asked to compute in: one of FLOAT_TYPES
    stored: str  # how the weights are stored: "float32", "float16" or "int8"
    # CPU capabilities it cannot run without (OpenVINO's OPTIMIZATION_CAPABILITIES names);
    # float16 needs none: it falls back to bfloat16, then float32
    needs: frozenset[str] = frozenset()

    @property
    def family(self) -> str:
        """``int8``, ``float32`` or ``half`` (float16 / bfloat16)."""
        if self.is_int8:
            return "int8"
        return "float32" if self.float_type == "float32" else "half"

    @classmethod
    def parse(cls, name: str | Precision) -> Precision:
        """The mode called ``name``; :class:`QuenchError` (one line) for an unknown name."""
        if isinstance(name, Precision):
            return name
        try:
            return _BY_NAME[name]
        except (KeyError, TypeError):
            raise QuenchError(
                f"unknown precision {name!r}; choose one of {', '.join(NAMES)}"
            ) from None

    def __str__(self) -> str:
        return self.name


FORCE_FLOAT32 = Precision("force_float32", False, "float32", "float32")
FORCE_FLOAT16 = Precision("force_float16", False, "float16", "float16")
FORCE_BFLOAT16 = Precision("force_bfloat16", False, "bfloat16", "float32", frozenset({"BF16"}))
QINT8_MIXED_FLOAT16 = Precision("qint8_mixed_float16", True, "float16", "int8", frozenset({"INT8"}))
QINT8_MIXED_FLOAT32 = Precision("qint8_mixed_float32", True, "float32", "int8", frozenset({"INT8"}))

ALL: tuple[Precision, ...] = (
    FORCE_FLOAT32,
    FORCE_FLOAT16,
    FORCE_BFLOAT16,
    QINT8_MIXED_FLOAT16,
    QINT8_MIXED_FLOAT32,
)
NAMES: tuple[str, ...] = tuple(p.name for p in ALL)
_BY_NAME = {p.name: p for p in ALL}


def is_int8(name: str) -> bool:
    """Whether the mode called ``name`` is an int8 one (unknown names raise)."""
    return Precision.parse(name).is_int8
