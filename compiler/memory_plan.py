"""`--max-memory GB`: how a compile keeps its peak memory under a bound — by running every
pass that reads activations block by block (compiler/layerwise.py), spilling the weights the
passes rewrite to a scratch file (compiler/weight_store.py), and keeping the activations
that cross block boundaries in memory up to a share of the bound, on disk past it.

The bound is split as: a fixed base (the interpreter, onnxruntime, the graph without its
weights), the activation cache's share, and the rest for one block, whose weights are held
about three times while its onnxruntime session is made (our float32 copy, the serialized
graph, onnxruntime's own). `memory_needed` is the inverse: the bound one block of a given
size needs, which the error for a too-small bound quotes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import UsageError

BASE_BYTES = 700 * 2**20            # python, numpy, onnxruntime, onnx_ir and the weight-free graph
BLOCK_COPIES = 3                    # a block's weights while its session is made
CACHE_SHARE = 0.15                  # of the bound, for crossing activations kept in memory


def memory_needed(block_bytes: int) -> int:
    """The --max-memory (bytes) under which a block of `block_bytes` of weights fits."""
    return int((BASE_BYTES + BLOCK_COPIES * block_bytes) / (1.0 - CACHE_SHARE))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What the layer-wise compile may use: bytes in all, and where it spills."""
    max_bytes: int
    scratch: Path                     # activation cache and spilled weights (removed after the compile)

    @property
    def cache_bytes(self) -> int:
        """Crossing activations held in memory before the cache spills to disk."""
        return int(self.max_bytes * CACHE_SHARE)

    @property
    def block_bytes(self) -> int:
        """The most weight one block may hold."""
        return max(0, (self.max_bytes - self.cache_bytes - BASE_BYTES) // BLOCK_COPIES)

    def describe(self) -> dict:
        return {"max_memory_bytes": self.max_bytes, "block_weight_cap_bytes": self.block_bytes,
                "cache_in_memory_bytes": self.cache_bytes}


def parse_max_memory(text: str | float | None) -> int | None:
    """`--max-memory 8` (GB, decimal) → bytes; None stays None."""
    if text is None:
        return None
    try:
        gb = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"--max-memory {text!r} is not a number of GB", hint="e.g. --max-memory 8") from None
    floor = memory_needed(0) / 1e9
    if not gb >= floor:
        raise UsageError(f"--max-memory {gb:g} GB is below what any compile needs ({floor:.1f} GB: the interpreter, "
                         "onnxruntime and the graph)", hint=f"pass at least --max-memory {floor:.1f}")
    return int(gb * 1e9)
