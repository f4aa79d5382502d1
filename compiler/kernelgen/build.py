"""Build rendered kernel sources into a shared library, cached by what went into it.

The key is a hash of the sources, the compiler's identity and the flags: the same specs
on the same toolchain reuse the library built before (`$QCOMPILE_CACHE/kernels/<key>/`),
so only a first compile pays the C++ build. ISA-specific code is compiled with
`__attribute__((target(...)))` per function and dispatched at run time, so the library
carries no global `-m` flags and loads on any CPU of its architecture.

The output folder also gets a `CMakeLists.txt`, so a user can rebuild the same sources
elsewhere against their own onnxruntime headers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..cache_dir import cache_root

if TYPE_CHECKING:        # onnxruntime is not needed to build CUDA kernels (a GPU machine may lack it)
    from .ort_headers import OrtHeaders

LIBRARY = "libqcompile_kernels.so"
FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-fPIC", "-shared", "-fvisibility=hidden", "-DORT_API_MANUAL_INIT")


class BuildFailed(Exception):
    """The compiler is missing or rejected the sources: the caller falls back to standard ops."""


@dataclasses.dataclass(frozen=True)
class BuiltLibrary:
    path: Path             # the cached library
    key: str               # its cache key
    compiler: str          # `CXX --version`'s first line
    seconds: float         # 0 when it came from the cache
    cached: bool


def compiler_command() -> list[str]:
    return shlex.split(os.environ.get("CXX", "g++"))


def _compiler_identity(cxx: list[str]) -> str:
    try:
        done = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BuildFailed(f"no C++ compiler ({' '.join(cxx)}: {err}); set CXX to one") from None
    if done.returncode != 0:
        raise BuildFailed(f"{' '.join(cxx)} --version failed: {done.stderr.strip()[:200]}")
    return done.stdout.splitlines()[0] if done.stdout else " ".join(cxx)


def build(sources: dict[str, str], headers: OrtHeaders) -> BuiltLibrary:
    """Compile the `.cpp` files of `sources` (helpers beside them) into one library, or reuse it."""
    cxx = compiler_command()
    identity = _compiler_identity(cxx)
    units = sorted(n for n in sources if n.endswith(".cpp"))
    cmd = [*cxx, *FLAGS, "-I", str(headers.include_dir), "-I", ".", *units, "-o", LIBRARY]
    return _cached(sources, (identity, " ".join(FLAGS), str(headers.api_version)), LIBRARY, identity,
                   lambda work: _run([cmd], work, cxx[0]))


def _cached(sources: dict[str, str], key_parts, library_name: str, identity: str, compile_in) -> BuiltLibrary:
    """The library built from `sources` by `compile_in(folder)`, from the cache when the sources
    and `key_parts` (toolchain, flags) are the ones it was built from."""
    digest = hashlib.sha256()
    for part in (*key_parts, *sorted(sources)):
        digest.update(part.encode() + b"\0")
    for name in sorted(sources):
        digest.update(sources[name].encode() + b"\0")
    key = digest.hexdigest()[:16]
    folder = cache_root() / "kernels" / key
    library = folder / library_name
    if library.is_file():
        return BuiltLibrary(library, key, identity, 0.0, True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    started = time.perf_counter()
    try:
        for name, text in sources.items():
            (work / name).write_text(text)
        try:
            compile_in(work)
        except BuildFailed as err:
            kept = cache_root() / "kernels" / "failed" / key
            shutil.rmtree(kept, ignore_errors=True)
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(work, kept)
            head, _, detail = str(err).partition("\n")
            raise BuildFailed(f"{head} (sources kept in {kept}):\n{detail}") from None
        try:
            work.rename(folder)
        except OSError:            # built meanwhile by another process
            if not library.is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return BuiltLibrary(library, key, identity, time.perf_counter() - started, False)


def _run(commands: list[list[str]], cwd: Path, tool: str, parallel: int = 1) -> None:
    """Run compiler commands in `cwd` (up to `parallel` at once); the first failure is a BuildFailed."""
    pending = list(commands)
    running: list[subprocess.Popen] = []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                cmd = pending.pop(0)
                try:
                    running.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                    text=True))
                except OSError as err:
                    raise BuildFailed(f"{tool} could not run: {err}") from None
            proc = running.pop(0)
            try:
                _, stderr = proc.communicate(timeout=1800)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise BuildFailed(f"{tool} ran over 30 minutes") from None
            if proc.returncode != 0:
                lines = [line for line in stderr.splitlines() if line.strip()]
                first = [line for line in lines if "error" in line][:8] or lines[:8]
                raise BuildFailed(f"{tool} failed on the generated kernels\n" + "\n".join(first))
    finally:
        for proc in running:
            proc.kill()


def cmakelists(sources: dict[str, str]) -> str:
    """A CMakeLists.txt that builds the same library from the same sources elsewhere."""
    units = " ".join(sorted(n for n in sources if n.endswith(".cpp")))
    return f"""# Generated by qcompile: builds {LIBRARY} from the kernel sources beside this file.
#   cmake -S . -B build -DORT_INCLUDE_DIR=/path/to/onnxruntime/include && cmake --build build
# ORT_INCLUDE_DIR: onnxruntime's C API headers, of an API version <= the runtime that loads the library.
cmake_minimum_required(VERSION 3.18)
project(qcompile_kernels CXX)
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
if(NOT CMAKE_BUILD_TYPE)
  set(CMAKE_BUILD_TYPE Release)
endif()
set(ORT_INCLUDE_DIR "" CACHE PATH "onnxruntime C API headers (onnxruntime_c_api.h, onnxruntime_lite_custom_op.h)")
if(NOT EXISTS "${{ORT_INCLUDE_DIR}}/onnxruntime_c_api.h")
  message(FATAL_ERROR "set ORT_INCLUDE_DIR to a folder holding onnxruntime_c_api.h")
endif()
add_library(qcompile_kernels SHARED {units})
target_include_directories(qcompile_kernels PRIVATE "${{ORT_INCLUDE_DIR}}" "${{CMAKE_CURRENT_SOURCE_DIR}}")
target_compile_definitions(qcompile_kernels PRIVATE ORT_API_MANUAL_INIT)
set_target_properties(qcompile_kernels PROPERTIES CXX_VISIBILITY_PRESET hidden)
"""


CUDA_LIBRARY = "libqcompile_cuda_kernels.so"
ORT_WRAPPER = "ort_ops.cu"       # the onnxruntime custom-op unit of the CUDA library
# -DNDEBUG: CUTLASS's device asserts are calls, and a call inside the wgmma pipeline makes ptxas
# serialize every wgmma (its warning C7510): a release build has none
NVCC_FLAGS = ("-O3", "-DNDEBUG", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC,-fvisibility=hidden")


def nvcc_command() -> list[str]:
    return shlex.split(os.environ.get("CUDACXX") or os.environ.get("NVCC") or "nvcc")


def gencode(archs: tuple[str, ...]) -> list[str]:
    """Machine code for each architecture ("80", "90a": Hopper's wgmma needs the arch-specific
    "a" target), and PTX of the last (a later GPU JIT-compiles it; not "a" PTX, which runs on
    that architecture only)."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def cuda_commands(sources: dict[str, str], archs: tuple[str, ...], include_dirs: tuple[Path, ...],
                  nvcc: list[str] | None = None) -> list[list[str]]:
    """The nvcc commands that build the library in the sources' folder: one object per `.cu`
    unit (they compile in parallel), then the link."""
    nvcc = nvcc or nvcc_command()
    includes = [f"-I{d}" for d in include_dirs] + ["-I."]
    units = sorted(n for n in sources if n.endswith(".cu"))
    compiles = [[*nvcc, *NVCC_FLAGS, *gencode(archs), *includes, "-c", u, "-o", u[:-3] + ".o"] for u in units]
    link = [*nvcc, "-shared", *gencode(archs), *[u[:-3] + ".o" for u in units], "-o", CUDA_LIBRARY]
    return [*compiles, link]


def build_cuda(sources: dict[str, str], archs: tuple[str, ...], include_dirs: tuple[Path, ...]) -> BuiltLibrary:
    """Compile the `.cu` units of `sources` with nvcc for `archs` (e.g. ("80", "90a")) into one shared
    library, or reuse it. No GPU is needed to build; `include_dirs` holds CUTLASS's headers."""
    nvcc = nvcc_command()
    try:
        done = subprocess.run([*nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BuildFailed(f"no CUDA compiler ({' '.join(nvcc)}: {err}); install the CUDA toolkit or set CUDACXX") \
            from None
    if done.returncode != 0:
        raise BuildFailed(f"{' '.join(nvcc)} --version failed: {done.stderr.strip()[:200]}")
    lines = done.stdout.strip().splitlines()
    identity = next((line for line in lines if "release" in line), lines[-1] if lines else " ".join(nvcc))
    commands = cuda_commands(sources, archs, include_dirs, nvcc)
    parallel = max(1, min(len(commands) - 1, os.cpu_count() or 1))

    def compile_in(work: Path) -> None:
        _run(commands[:-1], work, nvcc[0], parallel=parallel)
        _run(commands[-1:], work, nvcc[0])
    return _cached(sources, (identity, " ".join(NVCC_FLAGS), " ".join(gencode(archs)),
                             *(str(d) for d in include_dirs)), CUDA_LIBRARY, identity, compile_in)


def cuda_cmakelists(sources: dict[str, str], archs: tuple[str, ...]) -> str:
    """A CMakeLists.txt that builds the CUDA kernel library from the same sources elsewhere; the
    onnxruntime wrapper (ort_ops.cu) joins it where onnxruntime's headers are given."""
    units = " ".join(sorted(n for n in sources if n.endswith(".cu") and n != ORT_WRAPPER))
    arch_list = ";".join(str(a) for a in archs)
    return f"""# Generated by qcompile: builds {CUDA_LIBRARY} from the kernel sources beside this file.
#   cmake -S . -B build -DCUTLASS_INCLUDE_DIR=/path/to/cutlass/include \\
#         [-DORT_INCLUDE_DIR=/path/to/onnxruntime/include] && cmake --build build
# CMAKE_CUDA_ARCHITECTURES defaults to the target variant's ({arch_list}); override it with -D.
# With ORT_INCLUDE_DIR the library also registers its ops with onnxruntime (CUDA execution provider).
cmake_minimum_required(VERSION 3.24)
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES {arch_list})
endif()
project(qcompile_cuda_kernels LANGUAGES CXX CUDA)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
if(NOT CMAKE_BUILD_TYPE)
  set(CMAKE_BUILD_TYPE Release)
endif()
set(CUTLASS_INCLUDE_DIR "" CACHE PATH "CUTLASS headers (cutlass/cutlass.h): a CUTLASS checkout's include/")
set(ORT_INCLUDE_DIR "" CACHE PATH "onnxruntime C API headers (onnxruntime_cxx_api.h); empty: no onnxruntime ops")
if(NOT EXISTS "${{CUTLASS_INCLUDE_DIR}}/cutlass/cutlass.h")
  message(FATAL_ERROR "set CUTLASS_INCLUDE_DIR to a folder holding cutlass/cutlass.h")
endif()
set(UNITS {units})
if(EXISTS "${{ORT_INCLUDE_DIR}}/onnxruntime_cxx_api.h")
  list(APPEND UNITS {ORT_WRAPPER})
endif()
add_library(qcompile_cuda_kernels SHARED ${{UNITS}})
set_target_properties(qcompile_cuda_kernels PROPERTIES OUTPUT_NAME qcompile_cuda_kernels
                      CUDA_VISIBILITY_PRESET hidden CXX_VISIBILITY_PRESET hidden)
target_include_directories(qcompile_cuda_kernels PRIVATE "${{CUTLASS_INCLUDE_DIR}}" "${{CMAKE_CURRENT_SOURCE_DIR}}")
if(EXISTS "${{ORT_INCLUDE_DIR}}/onnxruntime_cxx_api.h")
  target_include_directories(qcompile_cuda_kernels PRIVATE "${{ORT_INCLUDE_DIR}}")
endif()
target_compile_options(qcompile_cuda_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>)
"""
