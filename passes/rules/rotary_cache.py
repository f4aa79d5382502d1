"""Rotary embeddings whose cos/sin come from a cached table or an outer product, as
onnxruntime's com.microsoft RotaryEmbedding (position ids + half-width cos/sin caches).

onnxscript's `rotary_embedding` rules find the rotation itself (rotate_half as
Slice/Neg/Concat, `x*cos + rotate_half(x)*sin`) and leave an intermediate
`ai.onnxruntime._fusion::RotaryEmbedding(x, cos, sin)`; its `cos_sin_cache` rules then turn
that into the onnxruntime op, but only for cos/sin computed as
`Transpose(MatMul(inv_freq, position_ids))`. Two common spellings miss it, and the
intermediate is inlined back:

* `gathered_cos_sin`: cos/sin Gathered by `position_ids` from constant [max_pos, head_dim]
  tables (the Hugging Face `cos_cached`/`sin_cached` buffers, models/llama_block.py).
  The tables' two halves are equal (non-interleaved rotary), so the left half is the cache.
* `outer_product_cos_sin`: frequencies as the broadcast product
  `Cast(Unsqueeze(position_ids, -1)) * inv_freq` (what torch's dynamo exporter and the
  onnxscript optimizer leave of `inv_freq @ position_ids`). The rewrite computes the cache
  in the graph for positions 0..max(position_ids), so no maximum length is assumed; one
  cache is shared by every rotary that reads the same inv_freq and position ids.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter._basics import MatchResult

_FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate RotaryEmbedding


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]


def _rank(value: ir.Value) -> int | None:
    return value.shape.rank() if value.shape is not None else None


class GatheredCosSin(RewriteRuleClassBase):
    """RotaryEmbedding(x, Unsqueeze(Gather(cos_table, pos), 1), Unsqueeze(Gather(sin_table, pos), 1))."""

    def __init__(self):
        super().__init__(remove_nodes=False)  # Q's and K's rotary read the same Gathers
        self._halves: dict[int, ir.Value] = {}

    def pattern(self, op, x, cos_table, sin_table, position_ids, cos_axes, sin_axes, interleaved, num_heads):
        # Gather's axis is checked, not matched: exporters omit the default 0
        cos = op.Unsqueeze(op.Gather(cos_table, position_ids, _allow_other_attributes=True,
                                     _outputs=["cos_rows"]), cos_axes)
        sin = op.Unsqueeze(op.Gather(sin_table, position_ids, _allow_other_attributes=True,
                                     _outputs=["sin_rows"]), sin_axes)
        return op.RotaryEmbedding(x, cos, sin, interleaved=interleaved, num_heads=num_heads, _domain=_FUSION_DOMAIN)

    def check(self, context, cos_table, sin_table, position_ids, cos_axes, sin_axes, interleaved, cos_rows,
              sin_rows, **_) -> MatchResult:
        result = MatchResult()
        if interleaved.value != 0:
            return result.fail("interleaved rotary: the table halves are not the cache")
        if any(rows.producer().attributes.get_int("axis", 0) != 0 for rows in (cos_rows, sin_rows)):
            return result.fail("cos/sin are not Gathered along the table's position axis (0)")
        if _ints(cos_axes) != [1] or _ints(sin_axes) != [1]:
            return result.fail("cos/sin are not unsqueezed on the head axis (1)", [cos_axes, sin_axes])
        if _rank(position_ids) != 2:
            return result.fail("position_ids is not [batch, sequence]", position_ids)
        for table in (cos_table, sin_table):
            if table.const_value is None or _rank(table) != 2:
                return result.fail("cos/sin table is not a constant [max_pos, head_dim]", table)
            values = table.const_value.numpy()
            half = values.shape[1] // 2
            if values.shape[1] % 2 or not np.array_equal(values[:, :half], values[:, half:]):
                return result.fail("cos/sin table halves differ (not a rotate_half table)", table)
        return result

    def rewrite(self, op, x, cos_table, sin_table, position_ids, interleaved, num_heads, **_):
        caches = []
        for table in (cos_table, sin_table):
            if id(table) not in self._halves:
                values = table.const_value.numpy()
                half = np.ascontiguousarray(values[:, : values.shape[1] // 2])
                name = f"{table.name}_half"
                self._halves[id(table)] = op.initializer(ir.tensor(half, name=name), name=name)
            caches.append(self._halves[id(table)])
        return op.RotaryEmbedding(x, position_ids, *caches, interleaved=interleaved.value,
                                  num_heads=num_heads.value, _domain="com.microsoft")

    def cleanup(self):
        self._halves.clear()


class OuterProductCosSin(RewriteRuleClassBase):
    """RotaryEmbedding(x, Unsqueeze(Cos(emb), 1), Unsqueeze(Sin(emb), 1)) with
    emb = Concat(f, f, -1) and f = Cast(Unsqueeze(position_ids, -1)) * inv_freq."""

    def __init__(self, name: str, positions_first: bool):
        super().__init__(name, remove_nodes=False)  # other rotaries may still read the cos/sin
        self._positions_first = positions_first
        self._caches: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}

    def pattern(self, op, x, position_ids, pos_axes, inv_freq, cos_axes, sin_axes, interleaved, num_heads):
        positions = op.Cast(op.Unsqueeze(position_ids, pos_axes), to=ir.DataType.FLOAT)
        freqs = op.Mul(positions, inv_freq) if self._positions_first else op.Mul(inv_freq, positions)
        emb = op.Concat(freqs, freqs, axis=-1)
        cos = op.Unsqueeze(op.Cos(emb), cos_axes)
        sin = op.Unsqueeze(op.Sin(emb), sin_axes)
        return op.RotaryEmbedding(x, cos, sin, interleaved=interleaved, num_heads=num_heads, _domain=_FUSION_DOMAIN)

    def check(self, context, position_ids, pos_axes, inv_freq, cos_axes, sin_axes, interleaved, **_) -> MatchResult:
        result = MatchResult()
        if interleaved.value != 0:
            return result.fail("interleaved rotary")
        if _rank(position_ids) != 2 or _ints(pos_axes) not in ([-1], [2]):
            return result.fail("positions are not position_ids [batch, sequence] unsqueezed last", position_ids)
        if _ints(cos_axes) != [1] or _ints(sin_axes) != [1]:
            return result.fail("cos/sin are not unsqueezed on the head axis (1)", [cos_axes, sin_axes])
        if inv_freq.const_value is None or inv_freq.const_value.numpy().squeeze().ndim != 1:
            return result.fail("inv_freq is not a constant vector", inv_freq)
        if inv_freq.shape is not None and any(d != 1 for d in list(inv_freq.shape)[:-1]):
            return result.fail("inv_freq broadcasts over more than its last axis", inv_freq)
        return result

    def rewrite(self, op, x, position_ids, inv_freq, interleaved, num_heads, **_):
        key = (id(inv_freq), id(position_ids))
        if key not in self._caches:
            freq = inv_freq.const_value.numpy().astype(np.float32).reshape(1, -1)
            name = f"{inv_freq.name}_row"
            row = op.initializer(ir.tensor(freq, name=name), name=name)
            count = op.Add(op.ReduceMax(position_ids, keepdims=0), op.Constant(value_int=1))
            positions = op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1))
            positions = op.Cast(op.Unsqueeze(positions, op.Constant(value_ints=[1])), to=ir.DataType.FLOAT)
            angles = op.MatMul(positions, row)                       # [max_pos + 1, head_dim / 2]
            self._caches[key] = (op.Cos(angles), op.Sin(angles))
        cos, sin = self._caches[key]
        return op.RotaryEmbedding(x, position_ids, cos, sin, interleaved=interleaved.value,
                                  num_heads=num_heads.value, _domain="com.microsoft")

    def cleanup(self):
        self._caches.clear()


gathered_cos_sin_rules = RewriteRuleSet([GatheredCosSin.rule()])
outer_product_cos_sin_rules = RewriteRuleSet([OuterProductCosSin.rule("OuterProductCosSin", positions_first=True),
                                              OuterProductCosSin.rule("OuterProductCosSin_freq_first",
                                                                      positions_first=False)])
