"""Target backends: one sub-package per target family (descriptor data, lowering passes,
emitters). Importing this package registers their passes."""

from . import ascend, cpu, cuda  # noqa: F401


def reference_lowering(model, report: dict | None = None):
    """(an onnxruntime-runnable reference lowering of a deploy graph that uses target ops, what
    it is) or None when onnxruntime runs `model` as it is; `report` is the compile's report.json
    when it is at hand (it records settings the lowering used)."""
    for family in (ascend,):
        found = family.reference_lowering(model, report)
        if found is not None:
            return found
    return None
