#!/usr/bin/env bash
# Downloads, on a machine with a package index, the pure-Python wheels that benchmarks/gpu_check.sh installs
# on an offline GPU machine: the CUTLASS headers of the fused kernels and the two peers of the margin-softmax
# benchmark. They go to .whl/ (ignored by git through .git/info/exclude) and travel with the working tree.
#
#   benchmarks/fetch_gpu_wheels.sh
#
# Pinned: the kernels are written against this CUTLASS, and the benchmark calls Liger's autograd function
# with this version's argument list.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .git/info/exclude 2> /dev/null || echo "/.whl/" >> .git/info/exclude
python -m pip download --no-deps --only-binary=:all: -d .whl \
  nvidia-cutlass==4.2.0.0 cut-cross-entropy==25.1.1 liger-kernel==0.8.5
ls -l .whl
