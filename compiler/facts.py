"""Pass contracts: the facts a pass needs, gives and invalidates, and the order check.

A fact is something true of the graph at a point in the pipeline ("activation ranges are
measured", "the graph holds Q/DQ"). Each pass declares, from its config alone, which facts
it needs, which it gives and which it invalidates (`QPass.needs` / `gives` / `invalidates`;
not onnx_ir's `requires`/`ensures`, which check a model at run time); `check_order` walks a
recipe's steps before any work and refuses:

* a pass whose needed fact no earlier pass gives;
* a pass that invalidates a fact an earlier pass gave (an equalizing pass after `calibrate`
  would leave `quantize` with stale ranges; a weight algorithm after `quantize` would be
  rounding weights the Q/DQ graph no longer reads). Both passes are named.

The same declarations drive the pipeline's range requests: before a pass that gives
`RANGES` runs, every later pass that wants ranges says for which tensors.
"""

from __future__ import annotations

import enum
from typing import Iterable

from .errors import RecipeError


class Fact(enum.Enum):
    CANONICAL = "canonical"               # canonicalize: one normal form, shapes inferred
    FUSED = "fused"                       # fuse: transformer subgraphs are fused operators
    RANGES = "ranges"                     # calibrate: activation statistics of the float model
    SMOOTHED = "smoothed"                 # smooth_quant: outliers moved into weights
    EQUALIZED = "equalized"               # cle / equalize_outputs: channel ranges balanced
    WEIGHTS_ROUNDED = "weights_rounded"   # gptq / awq: weights chosen for a weight scheme
    SPARSE = "sparse"                     # sparsify: weights pruned to a sparsity pattern
    QDQ = "qdq"                           # quantize / quantize_attention: Q/DQ in the graph
    LOWERED = "lowered"                   # a target's lowering ran

    def __str__(self) -> str:
        return self.value


# What a pass that changes the float model's values breaks: measured ranges and any Q/DQ
# (with its quantized weights) made from the old values.
FLOAT_MODEL_CHANGED = frozenset({Fact.RANGES, Fact.QDQ})


def _names(facts: Iterable[Fact]) -> str:
    return ", ".join(sorted(str(f) for f in facts))


def check_order(steps, file: str, passes: dict, initial: Iterable[Fact] = ()) -> None:
    """Refuse a step order the passes' contracts do not allow (see the module docstring).

    `steps` are recipe steps (`.spec.name`, `.spec.cls`, `.config`); `passes` the registered
    passes by name, to say which ones would provide a missing fact."""
    given: dict[Fact, str] = {fact: "the input" for fact in initial}   # fact -> the pass that gave it
    for step in steps:
        cls, config, name = step.spec.cls, step.config, step.spec.name
        missing = cls.needs(config) - set(given)
        if missing:
            providers = sorted(p for p, spec in passes.items() if missing & spec.cls.gives(spec.cls.Config()))
            raise RecipeError(f"needs {_names(missing)}, which no earlier pass provides",
                              file=file, pass_name=name,
                              hint=f"put {' or '.join(providers) or 'the providing pass'} before it")
        broken = sorted(cls.invalidates(config) & set(given), key=lambda f: f.value)
        if broken:
            fact = broken[0]
            raise RecipeError(f"changes the float model after '{given[fact]}' gave {fact}: "
                              f"{fact} would be stale for every pass after it",
                              file=file, pass_name=name, hint=f"put {name} before {given[fact]}")
        for fact in cls.gives(config):
            given[fact] = name
