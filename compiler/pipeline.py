"""Runs a recipe's steps over one model on onnx_ir's PassManager, with instruments.

Each step becomes its pass object wrapped so that instruments (in the style of TVM's
`PassInstrument`) run before and after it: `PassTiming` (seconds and `modified` per pass, for
the report), `DumpAfter` (`--dump-after`), `RangeRequests` (before a pass that gives ranges,
ask every later pass which tensors it wants them for). The pipeline itself knows no pass.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes

from .analyses import RangeRequest
from .facts import Fact
from .hostinfo import PhaseMeter
from .model_io import save_model
from .pass_context import PassContext, log
from .recipe import Recipe, Step


class PassInstrument:
    """Hooks around every pass of one pipeline run."""

    def before(self, index: int, step: Step, model: ir.Model) -> None:
        pass

    def after(self, index: int, step: Step, model: ir.Model, result: onnx_ir.passes.PassResult) -> None:
        pass


class PassTiming(PassInstrument):
    """Wall time, peak RSS and the pass's own `modified` answer, per pass (report.json → passes)."""

    def __init__(self):
        self.records: list[dict] = []
        self._meter: PhaseMeter | None = None

    def before(self, index, step, model):
        log.info("pass %s", step.spec.name)
        self._meter = PhaseMeter()

    def after(self, index, step, model, result):
        self.records.append({"pass": step.spec.name, **self._meter.done(), "modified": bool(result.modified)})


class DumpAfter(PassInstrument):
    """The graph after each named pass (or 'all'), as `NN-pass.onnx` in `folder`."""

    def __init__(self, names: frozenset[str], folder: Path):
        self.names, self.folder = names, folder

    def after(self, index, step, model, result):
        if step.spec.name in self.names or "all" in self.names:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_model(model, self.folder / f"{index:02d}-{step.spec.name}.onnx")


class RangeRequests(PassInstrument):
    """Before a pass that gives ranges: the union of what every later pass wants ranges for,
    asked of the graph as it is then, into `ctx.range_request`."""

    def __init__(self, steps: tuple[Step, ...], ctx: PassContext):
        self.steps, self.ctx = steps, ctx

    def before(self, index, step, model):
        if Fact.RANGES not in step.spec.cls.gives(step.config):
            return
        request = RangeRequest()
        for later in self.steps[index + 1:]:
            request = request | later.spec.cls.wants_ranges(model, later.config, self.ctx.target)
        self.ctx.range_request = request


class _Instrumented(onnx_ir.passes.InPlacePass):
    """One step's pass with the instruments around it."""

    def __init__(self, index: int, step: Step, inner: onnx_ir.passes.PassBase, instruments: list[PassInstrument]):
        super().__init__()
        self.index, self.step, self.inner, self.instruments = index, step, inner, instruments

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        for instrument in self.instruments:
            instrument.before(self.index, self.step, model)
        result = self.inner(model)
        for instrument in self.instruments:
            instrument.after(self.index, self.step, result.model, result)
        return result

    def __str__(self) -> str:
        return self.step.spec.name


def run_pipeline(model: ir.Model, recipe: Recipe, ctx: PassContext,
                 instruments: list[PassInstrument] = ()) -> ir.Model:
    """Run `recipe`'s steps in order over `model` (in place); `RangeRequests` is always on."""
    instruments = [RangeRequests(recipe.steps, ctx), *instruments]
    passes = [_Instrumented(i, step, step.spec.cls(step.config, ctx), instruments)
              for i, step in enumerate(recipe.steps)]
    try:
        result = onnx_ir.passes.PassManager(passes, steps=1)(model)
    except onnx_ir.passes.PassError as err:
        raise _root_cause(err) from None
    return result.model


def _root_cause(err: BaseException) -> BaseException:
    """The exception a pass raised, out of the PassManager's PassError wrappers (a user error
    keeps its message and exit code; a bug its own traceback)."""
    while isinstance(err, onnx_ir.passes.PassError) and err.__cause__ is not None:
        err = err.__cause__
    return err


__all__ = ["run_pipeline", "PassInstrument", "PassTiming", "DumpAfter", "RangeRequests"]
