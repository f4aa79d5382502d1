"""Target backends: one sub-package per target family (descriptor data, lowering passes,
emitters). Importing this package registers their passes."""

from . import ascend, cpu  # noqa: F401
