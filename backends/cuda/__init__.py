"""NVIDIA GPUs through TensorRT (`--target cuda[:sm80|sm89|sm90]`): the descriptor (cuda.yaml),
the architecture check (capabilities.py), the `cuda_lower` pass that checks the graph follows
TensorRT's explicit-quantization placement (placement.py) and writes trtexec.sh. See docs/cuda.md.
Generated CUDA kernels are not built yet."""

from . import lower  # noqa: F401  (registers cuda_lower)
from .capabilities import check_recipe  # noqa: F401  (the family hook qcompile.targets calls)
