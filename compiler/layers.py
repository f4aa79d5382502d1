"""The layer table: one typed record per quantizable layer, updated by the passes that decide
about it (quantize, fuse, a target's lowering, verify, the fallback strategies).

A record holds facts as objects — its status, the `Scheme` it got (granularity and dtypes as
applied, not as asked), its tensors, weight bytes, notes, what the target lowered it to and
the error verification measured — and renders to report.json's `layers` entries in one
place (`to_json`). Nothing reads a display label back.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Iterator

from .schemes import FLOAT8, INT4, Scheme


class LayerStatus(str, enum.Enum):
    QUANTIZED = "quantized"
    FLOAT = "float"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class WeightBytes:
    float: int
    quantized: int


@dataclasses.dataclass(frozen=True)
class LayerError:
    """What verification measured on a quantized layer's output."""
    tensor: str
    sqnr_db: float
    added_sqnr_db: float | None = None     # the noise this layer adds on top of its input's

    def to_json(self) -> dict:
        out = {"tensor": self.tensor, "sqnr_db": self.sqnr_db}
        if self.added_sqnr_db is not None:
            out["added_sqnr_db"] = self.added_sqnr_db
        return out


@dataclasses.dataclass
class LayerRecord:
    name: str
    op: str | None
    status: LayerStatus
    scheme: Scheme | None = None          # quantized: what the layer got (None for a custom kind)
    label: str | None = None              # display of the scheme, e.g. "W[int8 per_channel] A[uint8 per_tensor]"
    weight_label: str | None = None
    activation_label: str | None = None
    reason: str | None = None             # float: why
    input_tensor: str | None = None
    output_tensor: str | None = None
    weight_bytes: WeightBytes | None = None
    folded: str | None = None             # ReLU/Clip folded into the output quantization
    notes: list[str] = dataclasses.field(default_factory=list)
    lowering: dict[str, Any] = dataclasses.field(default_factory=dict)   # lowered_to, kernel, speed_note, ascend
    error: LayerError | None = None
    decision: "LayerRecord | None" = None  # float after a later pass: what quantize had decided

    @classmethod
    def quantized(cls, name: str, op: str, scheme: Scheme, *, has_weight: bool = True, **fields) -> "LayerRecord":
        """A layer quantized with `scheme` (activation dtype resolved), labelled from it;
        `has_weight` False for a MatMul of two activations (no weight to label)."""
        act = scheme.activation
        return cls(name, op, LayerStatus.QUANTIZED, scheme=scheme, label=scheme.label(),
                   weight_label=scheme.weight.label() if has_weight and scheme.weight is not None else None,
                   activation_label=act.label() if act is not None else "float", **fields)

    @classmethod
    def float(cls, name: str, op: str | None, reason: str) -> "LayerRecord":
        return cls(name, op, LayerStatus.FLOAT, reason=reason)

    @property
    def is_quantized(self) -> bool:
        return self.status is LayerStatus.QUANTIZED

    @property
    def weight_only(self) -> bool:
        """Quantized weights with float activations (W8A16, W4A16)."""
        return self.scheme is not None and self.scheme.weight is not None and self.scheme.activation is None

    def uses_dtype(self, dtypes) -> bool:
        """Whether its weights or activations are in one of `dtypes`."""
        if self.scheme is None:
            return False
        parts = (self.scheme.weight, self.scheme.activation)
        return any(p is not None and p.dtype in dtypes for p in parts)

    @property
    def float8(self) -> bool:
        return self.uses_dtype(FLOAT8)

    @property
    def int4_activations(self) -> bool:
        act = self.scheme.activation if self.scheme is not None else None
        return act is not None and act.dtype in INT4

    def note(self, text: str) -> None:
        self.notes.append(text)

    def to_json(self) -> dict:
        if not self.is_quantized:
            out = {"op": self.op, "status": str(self.status), "reason": self.reason}
            if self.decision is not None:
                out["quantize_decision"] = {"weight": self.decision.weight_label,
                                            "activation": self.decision.activation_label}
            return out
        out = {"op": self.op, "status": str(self.status), "scheme": self.label, "weight": self.weight_label,
               "activation": self.activation_label, "input_tensor": self.input_tensor,
               "output_tensor": self.output_tensor}
        if self.weight_bytes is not None:
            out["weight_bytes"] = {"float": self.weight_bytes.float, "quantized": self.weight_bytes.quantized}
        if self.folded:
            out["folded"] = self.folded
        if self.notes:
            out["note"] = "; ".join(self.notes)
        out.update(self.lowering)
        if self.error is not None:
            out["error"] = self.error.to_json()
        return out


class LayerTable:
    """Layer name -> LayerRecord, in the order layers were first decided about."""

    def __init__(self):
        self._records: dict[str, LayerRecord] = {}

    def set(self, record: LayerRecord) -> LayerRecord:
        self._records[record.name] = record
        return record

    def get(self, name: str) -> LayerRecord | None:
        return self._records.get(name)

    def __getitem__(self, name: str) -> LayerRecord:
        return self._records[name]

    def __contains__(self, name: str) -> bool:
        return name in self._records

    def __iter__(self) -> Iterator[LayerRecord]:
        return iter(list(self._records.values()))

    def __len__(self) -> int:
        return len(self._records)

    def quantized(self) -> list[LayerRecord]:
        return [r for r in self._records.values() if r.is_quantized]

    def count(self, status: LayerStatus) -> int:
        return sum(1 for r in self._records.values() if r.status is status)

    def fall_back(self, name: str, reason: str) -> LayerRecord:
        """Layer `name`, quantized so far, stays float: a later pass could not keep it (its
        decision is kept for the report)."""
        old = self._records[name]
        record = LayerRecord.float(name, old.op, reason)
        record.decision = old if old.is_quantized else old.decision
        return self.set(record)

    def to_json(self) -> dict[str, dict]:
        return {name: record.to_json() for name, record in self._records.items()}
