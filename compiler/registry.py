"""The pass registry: short names → pass classes with one frozen config each.

Passes are `onnx_ir` in-place passes. Each states the facts it needs and the facts
it establishes (for example `ranges` from `calibrate`), so a recipe that orders
passes wrongly is rejected before any work is done.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import onnx_ir as ir
import onnx_ir.passes


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    cls: type["QPass"]
    summary: str


_REGISTRY: dict[str, PassSpec] = {}


class QPass(onnx_ir.passes.InPlacePass):
    """Base of every qcompile pass: a typed config plus the shared compile context."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any, ctx: "Any"):
        super().__init__()
        self.config = config
        self.ctx = ctx

    # Facts: strings such as "ranges" or "qdq"; see docs/passes.md.
    @classmethod
    def needs(cls, config: Any) -> set[str]:
        return set()

    @classmethod
    def gives(cls, config: Any) -> set[str]:
        return set()

    @classmethod
    def keeps_dynamic_shapes(cls, config: Any) -> bool:
        """True when the compiled model must keep its dynamic input dimensions (a decoder's
        growing past length): the compile then does not pin them from the first calibration sample."""
        return False

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        modified = self.run(model)
        return onnx_ir.passes.PassResult(model, bool(modified))

    def run(self, model: ir.Model) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


def register_pass(name: str):
    """Class decorator registering a QPass under `name` (its recipe `type`)."""

    def wrap(cls: type[QPass]) -> type[QPass]:
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} registered twice")
        cls.name = name
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[name] = PassSpec(name, cls, summary)
        return cls

    return wrap


def _load_builtin_passes() -> None:
    # Importing the packages registers their passes.
    import qcompile.passes  # noqa: F401
    import qcompile.backends  # noqa: F401


def get_pass(name: str) -> PassSpec | None:
    _load_builtin_passes()
    return _REGISTRY.get(name)


def all_passes() -> dict[str, PassSpec]:
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))
