"""onnxruntime CPU target: descriptor (target.yaml) and the `cpu_lower` pass."""

from . import lower  # noqa: F401
