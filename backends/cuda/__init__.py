"""NVIDIA GPUs through TensorRT (`--target cuda[:sm80|sm89|sm90]`): the descriptor (cuda.yaml),
the architecture check (capabilities.py), the `cuda_lower` pass that checks the graph follows
TensorRT's explicit-quantization placement (placement.py) and writes trtexec.sh, and the
`cuda_kernels` pass (cuda_kernels.py) that serves the quantized MatMuls with generated CUDA
kernels (kernels/*.cu.j2) in model.kernels.onnx and OUT/kernels/. See docs/cuda.md."""

from . import cuda_kernels, lower  # noqa: F401  (registers cuda_kernels, cuda_lower)
from .capabilities import check_recipe  # noqa: F401  (the family hook qcompile.targets calls)
