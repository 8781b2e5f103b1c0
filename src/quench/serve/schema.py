"""The KServe v2 / Open Inference Protocol wire format as pydantic models.

Requests are validated against these models before any field is used (a malformed request is
a 400 naming the field), and the published OpenAPI description is generated from them.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from typing_extensions import TypeAliasType

Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr]  # noqa: UP007 (pydantic needs it)
# FP32 tensor data: numbers, flat or nested row-major (`null` stands for NaN in responses)
TensorData = TypeAliasType(
    "TensorData",
    "list[Union[StrictFloat, StrictInt, TensorData, None]]",  # type: ignore[misc]  # noqa: UP007
)


Count = Annotated[StrictInt, Field(ge=0)]  # a dimension or a byte count: no floats, no bools


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Parameters(BaseModel):
    """Protocol parameters: the binary-data ones typed, any other scalar passed through."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Scalar] = Field(init=False)  # type: ignore[assignment]

    binary_data_size: Count | None = None
    binary_data: StrictBool | None = None
    binary_data_output: StrictBool | None = None


class RequestInput(_Strict):
    name: StrictStr
    shape: list[Count]
    datatype: StrictStr
    parameters: Parameters | None = None
    data: TensorData | None = None


class RequestOutput(_Strict):
    name: StrictStr
    parameters: Parameters | None = None


class InferenceRequest(_Strict):
    """``POST /v2/models/{name}/infer`` (the JSON part, before any binary tensor data)."""

    id: StrictStr | StrictInt | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(..., min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: TensorData | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    quench: dict[str, Any] | None = None


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class IndexEntry(BaseModel):
    name: str
    version: str
    state: str


class ClassScore(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_: int = Field(..., alias="class")
    name: str
    score: float | None  # null when the model produced NaN


class Classification(BaseModel):
    model: str
    top: list[ClassScore]


class Error(BaseModel):
    """Every 4xx/5xx answer: ``{"error": "<one line>"}``."""

    error: str


_TAGS = ("float", "int", "bool", "str", "none", "list[", "function-", "TensorData", "union[")


def _field(loc: tuple[Any, ...]) -> str:
    """The field path of an error location, without pydantic's union-member tags."""
    parts = []
    for p in loc:
        if isinstance(p, str) and p.startswith(_TAGS):
            break
        parts.append(str(p))
    return ".".join(parts)


def describe(exc: ValidationError, what: str = "request") -> str:
    """A ValidationError as one line: the first problems, each with the field's path."""
    found: dict[str, str] = {}
    for e in exc.errors(include_url=False):
        if e["type"] == "json_invalid":
            return f"{what} body is not valid JSON ({e['msg']})"
        found.setdefault(_field(e["loc"]) or "body", e["msg"])
    parts = [f"{loc}: {msg}" for loc, msg in list(found.items())[:3]]
    more = len(found) - len(parts)
    return f"invalid {what}: " + "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
