"""Request and response models of the HTTP and WebSocket APIs (they also make the OpenAPI schema).

Array fields accept nested lists (JSON) or raw-bytes array maps (msgpack, see ``mlip.wire``);
both arrive here as numpy arrays so large inputs are never converted float by float.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema

Property = Literal["energy", "free_energy", "forces", "stress", "energies"]
DEFAULT_PROPERTIES: list[Property] = ["energy", "forces", "stress"]


def _float_array(value: Any) -> np.ndarray:
    """Nested lists or a decoded raw array of numbers -> float64 array (shape is checked with the structure).

    Strings and booleans are refused, not coerced: "1.5" or true as a coordinate is a client bug.
    """
    if isinstance(value, (str, bytes, dict)) or value is None:
        raise ValueError("must be an array of numbers")
    if isinstance(value, (list, tuple)) and any(
        isinstance(x, (bool, str)) for row in value for x in (row if isinstance(row, (list, tuple)) else (row,))
    ):
        raise ValueError("must be an array of numbers (no strings or booleans)")
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"must be a rectangular array of numbers ({err})") from err
    if array.dtype.kind not in "iuf" and array.size:
        raise ValueError(f"must be a rectangular array of numbers, got {array.dtype} values")
    return np.array(array, dtype=np.float64)  # a writable copy, also of read-only raw msgpack buffers


def _int_array(value: Any) -> np.ndarray:
    """A list or raw array of atomic numbers -> int64 array."""
    array = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if array is None or array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError("must be a 1-D list of integer atomic numbers")
    if array.size == 0:
        raise ValueError("must list at least one atom")
    return array.astype(np.int64)


def _pbc(value: Any) -> bool | list[bool]:
    """Periodicity: one boolean for all three directions, or three booleans."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) == 3 and all(isinstance(v, (bool, np.bool_)) for v in value):
        return [bool(v) for v in value]
    raise ValueError("must be true/false or a list of 3 booleans")


_MATRIX3 = {"type": "array", "items": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}}
Numbers = Annotated[
    np.ndarray,
    PlainValidator(_int_array),
    WithJsonSchema({"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 118}}),
]
Positions = Annotated[
    np.ndarray, PlainValidator(_float_array), WithJsonSchema({**_MATRIX3, "description": "N×3 Cartesian positions, Å"})
]
Cell = Annotated[
    np.ndarray,
    PlainValidator(_float_array),
    WithJsonSchema({**_MATRIX3, "minItems": 3, "maxItems": 3, "description": "3×3 lattice vectors as rows, Å"}),
]
Pbc = Annotated[
    bool | list[bool],
    PlainValidator(_pbc),
    WithJsonSchema({"anyOf": [{"type": "boolean"}, {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 3}]}),
]


class _Model(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")


class StructureIn(_Model):
    """One structure: atomic numbers, positions (Å), optional cell (Å rows) and periodicity."""

    numbers: Numbers
    positions: Positions
    cell: Cell | None = None
    pbc: Pbc | None = None


class CalculateRequest(_Model):
    """Structures to evaluate with one model; results come back in request order."""

    model: str | None = Field(None, description="model name from /v1/models; default model if omitted")
    structures: list[StructureIn] = Field(min_length=1)
    properties: list[Property] = Field(
        default_factory=lambda: list(DEFAULT_PROPERTIES), description="stress is returned for periodic structures only"
    )


class StreamStart(_Model):
    """WebSocket: open (or replace) the session's structure and evaluate it."""

    type: Literal["start"]
    id: int | None = Field(None, description="echoed in the reply")
    model: str | None = None
    numbers: Numbers
    positions: Positions
    cell: Cell | None = None
    pbc: Pbc | None = None
    properties: list[Property] = Field(default_factory=lambda: list(DEFAULT_PROPERTIES))


class StreamStep(_Model):
    """WebSocket: new positions (Å) for the session's structure; cell and pbc only when they change."""

    type: Literal["step"]
    id: int | None = None
    positions: Positions
    cell: Cell | None = None
    pbc: Pbc | None = None


StreamMessage = Annotated[StreamStart | StreamStep, Field(discriminator="type")]


class ModelRef(BaseModel):
    name: str
    sha256: str


class Result(BaseModel):
    """Properties of one structure (only those requested; stress for periodic structures only)."""

    energy: float | None = Field(None, description="eV")
    free_energy: float | None = Field(None, description="eV")
    forces: list[list[float]] | None = Field(None, description="N×3, eV/Å")
    energies: list[float] | None = Field(None, description="per-atom energies, eV")
    stress: list[list[float]] | None = Field(None, description="3×3, eV/Å³, ASE sign convention")


class CalculateResponse(BaseModel):
    model: ModelRef
    results: list[Result]


class ErrorDetail(BaseModel):
    field: str | None = Field(None, description="the offending field, e.g. structures[1].positions")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelInfo(BaseModel):
    name: str
    sha256: str
    species: list[int]
    cutoff: float = Field(description="Å")
    dtype: str
    device: str
    kernels: str = Field(description="equivariant kernels: e3nn or cueq (cuEquivariance)")
    default: bool
    summary: str | None = Field(None, description="first paragraph of the model card NAME.md")
    metadata: dict[str, Any]


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelInfo]
