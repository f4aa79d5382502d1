#!/usr/bin/env python3
"""The generated CUDA kernels on LLM shapes: a folder a GPU machine builds and runs in minutes.

    python tools/cuda_kernel_bench.py --variant sm90 --out build/gpu-bench     # here: render, no GPU
    bash build/gpu-bench/run.sh [RESULTS_PREFIX]                                # there: nvcc + check.py

`prepare` (here) renders every kernel at the shapes the issue asks for — the trained decoder's
(SmolLM2-135M: hidden 576, FFN 1536, 9 query / 3 KV heads of 64) and a 7B-class layer's (4096 x
4096, 4096 x 11008, 11008 x 4096; 32 heads of 128, 8 KV heads) — and writes them with
manifest.json, check.py and check_references.py, the CUTLASS headers and run.sh into one
folder. The GPU machine needs only nvcc, numpy and PyTorch (no onnxruntime, no qcompile install, no network): run.sh
compiles the library for the variant's architecture and runs check.py, which checks every
kernel against its numpy reference and times it against cuBLASLt int8 (`torch._int_mm`),
fp16 `torch.matmul` and fp16 SDPA at M = 1, 16, 512, 4096 (GEMMs), 1..16 (W4A16, as achieved
bandwidth against a device copy's), prefill and decode lengths (attention). Results:
RESULTS_PREFIX.json / .md (default: results in the folder).
"""

from __future__ import annotations

import argparse
import shutil
import stat
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qcompile.backends.cuda.cuda_kernels import ARCHITECTURES, HARNESS, TEMPLATES, kernel_spec  # noqa: E402
from qcompile.kernelgen import KernelSpec, manifest  # noqa: E402
from qcompile.kernelgen.build import CUDA_LIBRARY, ORT_WRAPPER, cuda_cmakelists, cuda_commands  # noqa: E402
from qcompile.kernelgen.cutlass_headers import find_cutlass  # noqa: E402
from qcompile.kernelgen.render import render_sources  # noqa: E402

# (K, N) of the linears: SmolLM2-135M (q/o, k/v, gate/up, down) and a 7B-class decoder layer
GEMMS = [(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096)]
W4A16_GROUP = 128
ATTENTION = [(64, 9), (128, 32)]                     # (head_dim, heads) for prefill
DECODE = [(64, 9, 3), (128, 32, 8)]                  # (head_dim, query heads, KV heads)


def llm_specs(variant: str) -> list[KernelSpec]:
    gemm = {"activation": "int8", "weight": "int8", "output": "float16"}
    specs = [kernel_spec("QGemmW8A8", gemm, {"K": k, "N": n}, variant, "", "per_token x per_channel") for k, n in GEMMS]
    specs += [kernel_spec("QuantizePerToken", {"activation": "float16"}, {"K": k}, variant, "rms_norm", "per_token")
              for k in sorted({k for k, _ in GEMMS})]
    specs += [kernel_spec("QGemmW4A16", {"activation": "float16", "weight": "int4"}, {"K": k, "N": n, "G": W4A16_GROUP},
                   variant, "", "per_group") for k, n in GEMMS if k % W4A16_GROUP == 0]
    specs += [kernel_spec("QAttentionInt8", {"activation": "float16"}, {"head_dim": d, "heads": h}, variant)
              for d, h in ATTENTION]
    specs += [kernel_spec("QAttentionKVCache", {"activation": "float16"}, {"head_dim": d, "q_heads": qh, "kv_heads": kvh},
                   variant, layout="per_channel") for d, qh, kvh in DECODE]
    return specs


RUN_SH = """#!/bin/sh
# Build the generated CUDA kernels for {arch} and check + time them (check.py). Needs nvcc,
# numpy and PyTorch with CUDA. Usage: sh run.sh [RESULTS_PREFIX]
set -e
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
start=$(date +%s)
# one nvcc per unit, as many at once as cores and memory allow (a CUTLASS 3 unit takes ~3.5 GB)
jobs=$(nproc)
mem=$(awk '/MemAvailable/ {{print int($2 / 4194304)}}' /proc/meminfo)
if [ "$mem" -lt "$jobs" ]; then jobs=$mem; fi
if [ "$jobs" -lt 1 ]; then jobs=1; fi
xargs -P "$jobs" -I CMD sh -c CMD <<'UNITS'
{compiles}
UNITS
{link}
echo "built {library} in $(( $(date +%s) - start )) s"
python3 check.py --library ./{library} --manifest manifest.json --iters 50 --out "${{1:-results}}"
"""


def prepare(variant: str, out: Path) -> Path:
    specs = llm_specs(variant)
    sources = render_sources(TEMPLATES, specs, "bench", unit="cu", library_templates=("qcompile_cuda_kernels.h.j2",))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, text in sources.items():
        (out / name).write_text(text)
    shutil.copytree(find_cutlass().include_dir, out / "cutlass-include")
    for harness in HARNESS:
        shutil.copyfile(TEMPLATES / harness, out / harness)
    archs = ARCHITECTURES[variant]
    (out / "CMakeLists.txt").write_text(cuda_cmakelists(sources, archs))
    doc = manifest(specs, layers={}, library=CUDA_LIBRARY, build={"architectures": list(archs)})
    (out / "manifest.json").write_text(__import__("json").dumps(doc, indent=2) + "\n")
    commands = cuda_commands(sources, archs, (Path("cutlass-include"),))
    compiles = "\n".join(" ".join(c) for c in commands[:-1] if ORT_WRAPPER not in c)
    run = out / "run.sh"
    run.write_text(RUN_SH.format(arch="/".join(f"sm_{a}" for a in archs), compiles=compiles,
                                 link=" ".join(commands[-1]), library=CUDA_LIBRARY))
    run.chmod(run.stat().st_mode | stat.S_IXUSR)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(ARCHITECTURES), default="sm90")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-bench")
    args = parser.parse_args(argv)
    folder = prepare(args.variant, args.out)
    kernels = sum(1 for p in folder.glob("*.cu"))
    print(f"wrote {folder}: {kernels} kernel units for {args.variant}; on a GPU machine: sh {folder}/run.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
