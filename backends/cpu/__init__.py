"""onnxruntime CPU target: descriptor (target.yaml), `generate_kernels` (generated kernels) and `cpu_lower`."""

from . import generated_kernels, lower  # noqa: F401
