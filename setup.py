"""Builds oclear_ext._C against the installed torch: `pip install --no-build-isolation .`

CPU kernels always. CUDA kernels when torch has CUDA and nvcc is found; FORCE_CUDA=1 forces them,
OCLEAR_SKIP_CUDA=1 skips them. With CUDA on and TORCH_CUDA_ARCH_LIST unset, the architectures are the
visible GPUs' (Hopper as 9.0a), or "8.0;9.0a" (A100, H100) when no GPU is visible. The fused margin-softmax
kernels (csrc/cuda_sm90, backend "cutlass_sm90") are built when 9.0a is in the list and the pinned
nvidia-cutlass package (requirements-cuda-build.txt) provides the CUTLASS headers; plain "9.0" would build
them as empty kernels and is refused beside 9.0a. The configuration is printed and recorded in
oclear_ext/_build_info.py, which the package checks at import.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0a"
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"  # requirements-cuda-build.txt


def cuda_decision() -> tuple[bool, str]:
    if os.environ.get("OCLEAR_SKIP_CUDA") == "1":
        return False, "OCLEAR_SKIP_CUDA=1"
    if os.environ.get("FORCE_CUDA") == "1":
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda}, nvcc under {CUDA_HOME}"


def visible_gpu_archs() -> str | None:
    """The visible GPUs' architectures for TORCH_CUDA_ARCH_LIST (9.0 as 9.0a: the fused kernels need it)."""
    if not torch.cuda.is_available():
        return None
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "") for major, minor in caps)


def cutlass_source_dir() -> str | None:
    """The CUTLASS headers of the installed nvidia-cutlass package, or None."""
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "source")
    return path if os.path.isdir(os.path.join(path, "include", "cute")) else None


def sm90_decision(archs: list[str]) -> tuple[str | None, str]:
    """(CUTLASS source dir or None, why) for the fused sm_90a kernels."""
    if "9.0a" not in archs:
        return None, "9.0a not in the arch list"
    if "9.0" in archs:
        sys.exit("oclear_ext build: TORCH_CUDA_ARCH_LIST has both 9.0 and 9.0a; keep 9.0a only (plain 9.0 builds "
                 "the fused kernels as empty functions)")
    cutlass = cutlass_source_dir()
    if cutlass is None:
        return None, f"nvidia-cutlass not installed (pip install --no-deps {CUTLASS_PIN})"
    return cutlass, f"CUTLASS headers in {cutlass}"


def sources(folder: str, pattern: str) -> list[str]:
    # Relative paths: setuptools refuses absolute source paths in some versions.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", folder, pattern)))


def torch_cxx_runtime() -> str | None:
    """Path of the shared C++ runtime (libstdc++.so.6) this process loaded with torch, or None (not Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:
        return None
    return min(paths) if paths else None


def write_build_info(with_cuda: bool, reason: str, archs: str | None, sm90: bool, sm90_reason: str,
                     cxx_flags: list[str]) -> None:
    info = {
        "torch_version": torch.__version__,
        "with_cuda": with_cuda,
        "cuda_reason": reason,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "cuda_archs": archs,
        "fused_sm90": sm90,  # the CUTLASS sm_90a kernels (backend "cutlass_sm90") are in this build
        "fused_sm90_reason": sm90_reason,
        "cxx_flags": cxx_flags,
        "machine": platform.machine(),
    }
    path = os.path.join(ROOT, "oclear_ext", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time; checked by oclear_ext/__init__.py at import.\n")
        f.write(f"BUILD_INFO = {info!r}\n")


def extension():
    with_cuda, reason = cuda_decision()
    # -fno-trapping-math lets GCC if-convert the selects in the epilogue loops (clamps, filter), without
    # which it leaves them scalar; torch itself is built with it. We never rely on FP exceptions.
    cxx_flags = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline header code that is parallel only under -fopenmp; without it every
        # CPU kernel here runs on one thread. The extension then needs libgomp.so.1, which resolves to the
        # copy torch has already loaded (same soname): one OpenMP runtime, sized by torch.set_num_threads.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
        # The extension must share torch's C++ runtime. A toolchain whose library path holds only
        # libstdc++.a (seen: a wrapper around g++ with -B to such a folder) links a private static copy
        # instead; error messages are formatted in that copy against torch's locale, and the first number
        # in one came out truncated here and segfaulted on an H100 machine. Naming the library torch loaded
        # resolves every runtime symbol from it before g++'s implicit -lstdc++ is searched.
        runtime = torch_cxx_runtime()
        if runtime is not None:
            link_flags.append(runtime)
    else:
        print("oclear_ext build: no OpenMP on this platform: the CPU kernels run on one thread")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    srcs = sources("ops", "*.cpp") + sources("cpu", "*.cpp")
    archs = None
    cutlass, sm90_reason = None, "no CUDA build"
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = visible_gpu_archs() or DEFAULT_CUDA_ARCHS
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        srcs += sources("cuda", "*.cu")
        macros = [("OCLEAR_WITH_CUDA", "1")]
        cutlass, sm90_reason = sm90_decision(archs.replace(" ", ";").split(";"))
        # The fused kernels' file is compiled either way: without 9.0a it defines launchers that report
        # "not built", so the glue links and says why at dispatch.
        srcs += sources("cuda_sm90", "*.cu")
        if cutlass is not None:
            macros.append(("OCLEAR_WITH_SM90A", "1"))
            include_dirs += [os.path.join(cutlass, "include"), os.path.join(cutlass, "tools", "util", "include")]
        print(f"oclear_ext build: fused sm_90a kernels {'ON' if cutlass else 'OFF'} ({sm90_reason})")
        ext = CUDAExtension(
            "oclear_ext._C",
            srcs,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension("oclear_ext._C", srcs, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=link_flags)
    print(
        f"oclear_ext build: torch {torch.__version__}, CUDA kernels {'ON' if with_cuda else 'OFF'} ({reason})"
        + (f", archs {archs}" if with_cuda else "")
        + f", {len(srcs)} sources"
    )
    write_build_info(with_cuda, reason, archs, cutlass is not None, sm90_reason, cxx_flags)
    return ext


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
