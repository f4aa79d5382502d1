"""KernelSpec: one specialisation of one generated kernel, as data.

A spec is everything a template may read: the op, its dtypes, the dimensions fixed at
compile time (baked into the source as constants), the ones left to run time, how the
scales are laid out, the epilogue and the ISA. Equal specs are one kernel: the lowering
deduplicates them, and `id` (a content hash) names the kernel in the graph (the node's
`spec` attribute), in the sources and in OUT/kernels/manifest.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

DOMAIN = "com.qcompile"          # the custom-op domain of every generated kernel
DOMAIN_VERSION = 1


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    op: str                                   # the com.qcompile op type, e.g. QMatMulPerToken
    family: str                               # cpu | cuda | ascend: which templates serve it
    isa: str                                  # the target variant it is specialised for (avx512_vnni, avx2, ...)
    dtypes: tuple[tuple[str, str], ...]       # (role, dtype): ("activation", "int8"), ("weight", "int8"), ...
    static_dims: tuple[tuple[str, int], ...]  # (name, value) baked into the source: ("K", 384), ("N", 1536)
    dynamic_dims: tuple[str, ...] = ()        # dims known only at run time: ("M",)
    scale_layout: str = ""                    # e.g. "per_token x per_channel"
    epilogue: str = ""                        # e.g. "bias"

    def dims(self) -> dict[str, int]:
        return dict(self.static_dims)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtypes"] = dict(self.dtypes)
        d["static_dims"] = dict(self.static_dims)
        d["dynamic_dims"] = list(self.dynamic_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "KernelSpec":
        """The inverse of `to_dict` (a manifest entry's `spec` back into a spec with the same id)."""
        return cls(op=d["op"], family=d["family"], isa=d["isa"], dtypes=tuple(d["dtypes"].items()),
                   static_dims=tuple(d["static_dims"].items()), dynamic_dims=tuple(d["dynamic_dims"]),
                   scale_layout=d["scale_layout"], epilogue=d["epilogue"])

    @property
    def id(self) -> str:
        """A stable content hash: same spec, same id, on every machine and run."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def symbol(self) -> str:
        """The C++ identifier of this specialisation."""
        return f"{self.op}_{self.id}"


def manifest(specs, *, layers: dict[str, list[str]], library: str | None, build: dict) -> dict:
    """OUT/kernels/manifest.json: each kernel's spec and the layers that run it, and the build."""
    return {
        "domain": DOMAIN,
        "domain_version": DOMAIN_VERSION,
        "library": library,
        "build": build,
        "kernels": [{"id": s.id, "spec": s.to_dict(), "layers": sorted(layers.get(s.id, []))}
                    for s in sorted(specs, key=lambda s: (s.op, s.id))],
    }
