"""Builds and runs the dependency-free C++ unit tests (csrc/tests/*.cpp, CMakeLists.txt at the repo
root) through CMake + CTest, so `pytest` also covers the header-only math in csrc/include/oclear.

A missing `cmake` fails the test. The tests link no torch and build in a few seconds; the emulated
tensor-core attention test and its ThreadSanitizer build take ~35 s to run on two cores, the emulated fused
margin-softmax kernels and theirs ~25 s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _describe(proc: subprocess.CompletedProcess) -> str:
    return f"$ {' '.join(proc.args)}\n(exit {proc.returncode})\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


def test_cpp_unit_tests_pass(tmp_path: Path) -> None:
    cmake = shutil.which("cmake")
    # A missing cmake fails the test rather than skipping it: the C++ unit tests are part of the suite.
    assert cmake is not None, "cmake not found on PATH: it builds the C++ unit tests in csrc/tests (apt-get install cmake)"
    ctest = shutil.which("ctest") or str(Path(cmake).with_name("ctest"))
    build = tmp_path / "build"

    configure = [cmake, "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja"):
        configure[1:1] = ["-G", "Ninja"]
    proc = _run(configure, timeout=120)
    assert proc.returncode == 0, "CMake configure failed\n" + _describe(proc)

    proc = _run([cmake, "--build", str(build), "--parallel", str(os.cpu_count() or 2)], timeout=300)
    assert proc.returncode == 0, "CMake build failed\n" + _describe(proc)

    proc = _run([ctest, "--output-on-failure"], timeout=300, cwd=build)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, "ctest failed\n" + _describe(proc)
    summary = re.search(r"(\d+)% tests passed, (\d+) tests failed out of (\d+)", out)
    assert summary is not None, "no CTest summary in the output\n" + _describe(proc)
    assert summary.group(1) == "100" and summary.group(2) == "0", summary.group(0)
    assert int(summary.group(3)) >= 1, "CTest ran no tests (csrc/tests/*.cpp not found?)"
    # The race check of the tensor-core attention kernels (CMakeLists.txt, OCLEAR_TSAN_TEST) must have run.
    assert re.search(r"test_concept_attention_tc_emulated_tsan \.+\s+Passed", out), "the ThreadSanitizer test did not pass"
    # The fused margin softmax's per-row kernels under the CUDA emulation (CMakeLists.txt), and their race check.
    assert re.search(r"test_margin_softmax_fused_emulated \.+\s+Passed", out), "the emulated fused kernels did not pass"
    assert re.search(r"test_margin_softmax_fused_emulated_tsan \.+\s+Passed", out), "their race check did not pass"
