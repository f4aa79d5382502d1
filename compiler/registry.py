"""Pass base class and registration: short names -> pass classes with one frozen config each.

Passes are `onnx_ir` in-place passes. Each declares its contract from its config alone —
the facts it needs, gives and invalidates (compiler/facts.py), the tensors it wants ranges
for, the opset it needs, what it asks of the target — so a recipe is checked before any
work. Registering is importing: `@register_pass("name")` on the class; the catalog of
built-in passes (compiler/pass_catalog.py) imports the packages that hold them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import onnx_ir as ir
import onnx_ir.passes

from .analyses import RangeRequest
from .facts import Fact


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    cls: type["QPass"]
    summary: str


_REGISTRY: dict[str, PassSpec] = {}


class QPass(onnx_ir.passes.InPlacePass):
    """Base of every qcompile pass: a typed config plus the compile's PassContext."""

    name: ClassVar[str]
    Config: ClassVar[type]
    # the contract as data; a pass whose contract depends on its config overrides the method
    NEEDS: ClassVar[frozenset[Fact]] = frozenset()
    GIVES: ClassVar[frozenset[Fact]] = frozenset()
    INVALIDATES: ClassVar[frozenset[Fact]] = frozenset()

    def __init__(self, config: Any, ctx: Any):
        super().__init__()
        self.config = config
        self.ctx = ctx

    # -- contract (class-level: checked before any model is loaded) -----------------------
    @classmethod
    def needs(cls, config: Any) -> frozenset[Fact]:
        return cls.NEEDS

    @classmethod
    def gives(cls, config: Any) -> frozenset[Fact]:
        return cls.GIVES

    @classmethod
    def invalidates(cls, config: Any) -> frozenset[Fact]:
        """Facts this pass makes stale: a pass that changes the float model's values
        invalidates facts.FLOAT_MODEL_CHANGED."""
        return cls.INVALIDATES

    @classmethod
    def wants_ranges(cls, model: ir.Model, config: Any, target: Any) -> RangeRequest:
        """Tensors this pass will want activation statistics for (asked before calibrate runs)."""
        return RangeRequest()

    @classmethod
    def keeps_dynamic_shapes(cls, config: Any) -> bool:
        """True when the compiled model must keep its dynamic input dimensions (a decoder's
        growing past length): the compile then does not pin them from the first calibration sample."""
        return False

    @classmethod
    def min_opset(cls, config: Any, target: Any = None, model: ir.Model | None = None) -> int:
        """The lowest ONNX opset the graph must be at for this pass (0: any); `model`, when
        given, is the loaded input (a pass with nothing to do on it may need nothing)."""
        return 0

    @classmethod
    def check_target(cls, config: Any, target: Any) -> str | None:
        """Why `target` cannot run what this config asks for (None: it can)."""
        return None

    @classmethod
    def check_model(cls, config: Any, model: ir.Model) -> None:
        """Raise a user error when the loaded model cannot take this pass (a KV-cache pass on a
        graph without a cache, a pattern its weights do not fit); called for every step before
        the first pass runs, so the refusal comes before any work."""

    # -- running ---------------------------------------------------------------------------
    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        modified = self.run(model)
        return onnx_ir.passes.PassResult(model, bool(modified))

    def run(self, model: ir.Model) -> bool:  # pragma: no cover - abstract
        """Rewrite `model` in place; True when it changed."""
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


def registered() -> dict[str, PassSpec]:
    """The passes registered so far (by the modules imported so far), by name."""
    return dict(sorted(_REGISTRY.items()))
