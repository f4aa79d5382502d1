"""Huawei Ascend targets (ascend310b, ascend310p, ascend910b): descriptors (*.yaml), ATC's ONNX
operator list (atc_onnx_ops.txt), the capability check, the `ascend_lower` pass, the reference
lowering used for verification, and the emitted atc.sh / model.qdq.onnx. See docs/ascend.md."""

from . import lower  # noqa: F401  (registers ascend_lower)
from .capabilities import check_recipe  # noqa: F401  (the family hook qcompile.targets calls)
