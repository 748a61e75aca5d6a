"""The CUDA compile gate's resource report (.ci/ptxas_report.py): spills fail it, except in float64 kernels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "ptxas_report.py"

ENTRY = """ptxas info    : Compiling entry function '{name}' for 'sm_90'
ptxas info    : Function properties for {name}
    {stack} bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 256 bytes smem, 505 bytes cmem[0]
"""
# Mangled names of a float and a double instantiation: void k<float>(float*), void k<double>(double*).
FLOAT_KERNEL, DOUBLE_KERNEL = "_Z1kIfEvPT_", "_Z1kIdEvPT_"


def report(tmp_path: Path, log: str) -> subprocess.CompletedProcess:
    path = tmp_path / "build.log"
    path.write_text(log)
    return subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, timeout=60)


def test_clean_log_passes_and_lists_every_kernel(tmp_path):
    log = ENTRY.format(name=FLOAT_KERNEL, stack=0, stores=0, loads=0) + ENTRY.format(name=DOUBLE_KERNEL, stack=0, stores=0, loads=0)
    proc = report(tmp_path, log)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kernel compilations, 0 with spills" in proc.stdout
    assert "256" in proc.stdout  # shared memory column


def test_spill_in_a_float_kernel_fails(tmp_path):
    proc = report(tmp_path, ENTRY.format(name=FLOAT_KERNEL, stack=8, stores=4, loads=12))
    assert proc.returncode == 1
    assert "SPILLS" in proc.stdout and "spills:" in proc.stderr


def test_spill_in_a_float64_kernel_is_allowed(tmp_path):
    proc = report(tmp_path, ENTRY.format(name=DOUBLE_KERNEL, stack=8, stores=4, loads=4))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "spills allowed" in proc.stdout


def test_properties_of_a_callee_are_not_charged_to_the_kernel(tmp_path):
    log = ENTRY.format(name=FLOAT_KERNEL, stack=0, stores=0, loads=0) + (
        "ptxas info    : Function properties for __internal_trig_reduction_slowpathd\n"
        "    40 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n")
    assert report(tmp_path, log).returncode == 0


def test_empty_log_fails(tmp_path):
    proc = report(tmp_path, "nothing compiled\n")
    assert proc.returncode == 1 and "nothing was compiled" in proc.stderr
