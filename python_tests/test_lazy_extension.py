"""The pure-Python layers import and run without the compiled kernels; the first use of an op says how to build."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

NO_BUILD = """
import importlib.abc, sys
class NoKernels(importlib.abc.MetaPathFinder):  # as if oclear_ext._C had never been built
    def find_spec(self, name, path, target=None):
        if name == "oclear_ext._C":
            raise ImportError("simulated: no compiled kernels")
sys.meta_path.insert(0, NoKernels())
"""
OTHER_TORCH = """
import sys, types
info = types.ModuleType("oclear_ext._build_info")
info.BUILD_INFO = {"torch_version": "0.0.0", "with_cuda": False}
sys.modules["oclear_ext._build_info"] = info  # as if built against another torch
"""
USE = """
import oclear_ext, oclear_ext.data, oclear_ext.data.govern, oclear_ext.eval
from oclear_ext.eval.cli import main
main(["--out", sys.argv[1], "--grid-queries", "0"])       # oclear-eval: built-in emoji, pixel baseline
assert "oclear_ext._C" not in sys.modules
try:
    oclear_ext.margin_softmax_loss
except ImportError as err:
    print("OP ERROR:", err)
"""


@pytest.mark.parametrize("broken, message", [(NO_BUILD, "failed to load (simulated: no compiled kernels)"),
                                             (OTHER_TORCH, "was built against torch 0.0.0")])
def test_data_and_eval_run_without_the_kernels_and_ops_say_how_to_rebuild(tmp_path, broken, message):
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(broken) + USE, str(tmp_path / "eval")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["instance"]["queries"] == 579
    error = [line for line in done.stdout.splitlines() if line.startswith("OP ERROR:")]
    assert len(error) == 1 and message in error[0] and "pip install --no-build-isolation" in error[0]
