#!/usr/bin/env bash
# CUDA compile gate for CI on a machine without GPU (docs/design.md#build):
#  1. CMake's OCLEAR_CUDA_GATE target: every csrc/cuda/*.cu for sm_80 and sm_90, and the fused CUTLASS
#     kernels csrc/cuda_sm90/*.cu for sm_90a, with -Xptxas -v; a kernel that does not compile fails
#     here. The full log (registers, spills, shared memory per kernel) is kept, .ci/ptxas_report.py
#     fails on spills outside the allow-list below and on serialised wgmma, and .ci/check_wgmma.py on a
#     CUTLASS kernel without wgmma in its PTX. csrc/tests/gate_sm90_shapes.cu, linked with the sm_90a
#     object, asks CUTLASS's can_implement (host code) about every shape the fused backend promises.
#     Needs the nvidia-cutlass package (its headers).
#  2. The CUDA sections of the torch glue (csrc/ops/*.cpp that mention OCLEAR_WITH_CUDA) are
#     compiled (not linked) with -DOCLEAR_WITH_CUDA against the installed torch's headers (a CPU
#     wheel lacks c10/cuda's generated cmake-macros header: C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips
#     it, which only affects export macros), and every oclear::cuda:: launcher they call must be
#     defined by the kernel objects with the same signature (a link error caught without a GPU
#     torch). Needs torch installed.
# Logs go to $OCLEAR_CI_LOG_DIR (default build/ci-logs). Without nvcc the gate fails, unless
# OCLEAR_SKIP_CUDA_GATE=1 says to skip it.
set -euo pipefail
cd "$(dirname "$0")/.."

LOG_DIR=${OCLEAR_CI_LOG_DIR:-build/ci-logs}
mkdir -p "$LOG_DIR"
if [[ "${OCLEAR_SKIP_CUDA_GATE:-0}" == 1 ]]; then
  echo "cuda gate: skipped (OCLEAR_SKIP_CUDA_GATE=1)"
  exit 0
fi
if ! command -v nvcc > /dev/null; then
  echo "cuda gate: nvcc not found on PATH; install the CUDA toolkit or set OCLEAR_SKIP_CUDA_GATE=1" >&2
  exit 1
fi
start=$(date +%s)
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
generator=()
command -v ninja > /dev/null && generator=(-G Ninja)

log="$LOG_DIR/cuda_gate_build.log"
if ! { cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DOCLEAR_CUDA_GATE=ON &&
       cmake --build "$build" --target oclear_cuda_gate oclear_cuda_gate_sm90 gate_sm90_shapes --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" -v; } > "$log" 2>&1; then
  tail -n 60 "$log" >&2
  echo "cuda gate: FAILED to compile the CUDA kernels (full log: $log)" >&2
  exit 1
fi
# Allowed spills: float64 instantiations (correctness paths), and two concept-attention instantiations on
# sm_80 only (forward for Dh 33..64: 16/24 bytes; dK/dV for Dh 65..128: 16/24 bytes; sm_90 is clean).
# They are to be removed when the kernels are tuned on a GPU (issue 10), not hidden: the report lists them.
# (<double> as a template argument, not MarginParams<double> in a signature, which many float kernels take.)
allow='(?<!MarginParams)<double(, double)?>|^sm_80 .*::(forward_kernel<[^,]+, 2>|backward_dkdv_kernel<[^,]+, 4>)\('
python .ci/ptxas_report.py "$log" --allow-spills "$allow" | tee "$LOG_DIR/cuda_gate_ptxas.txt"
# The fused sm_90a GEMMs: every CUTLASS kernel entry in the kept PTX must issue wgmma (a build for plain
# sm_90, or a lost arch guard, compiles them to empty bodies that would still pass ptxas).
python .ci/check_wgmma.py "$build/sm90_ptx" | tee "$LOG_DIR/cuda_gate_wgmma.txt"
# CUTLASS's can_implement on every shape the fused backend promises (and on the ones the glue refuses by name).
if ! "$build/gate_sm90_shapes" > "$LOG_DIR/cuda_gate_sm90_shapes.txt" 2>&1; then
  cat "$LOG_DIR/cuda_gate_sm90_shapes.txt" >&2
  echo "cuda gate: a CUTLASS GEMM refuses a shape the fused backend promises (csrc/tests/gate_sm90_shapes.cu)" >&2
  exit 1
fi
echo "cuda gate: sm_90a shapes: $(tail -n 1 "$LOG_DIR/cuda_gate_sm90_shapes.txt")"

torch_includes=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))")
# nvcc may be a wrapper script: ask it where its toolkit lives.
cuda_home=${CUDA_HOME:-$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)}
flags=(-std=c++17 -c -O0 -Wall -Wextra -Werror -DOCLEAR_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
       -Icsrc/include -isystem "$cuda_home/include")
for inc in $torch_includes; do flags+=(-isystem "$inc"); done
glue_log="$LOG_DIR/cuda_gate_glue.log"
: > "$glue_log"
mkdir -p "$build/glue"
pids=()
files=()
for f in csrc/ops/*.cpp; do
  grep -q OCLEAR_WITH_CUDA "$f" || continue
  files+=("$f")
  ( "${CXX:-g++}" "${flags[@]}" "$f" -o "$build/glue/$(basename "$f").o" > "$LOG_DIR/glue_$(basename "$f").log" 2>&1 ) &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    status=1
    echo "cuda gate: glue compile FAILED: ${files[$i]}" | tee -a "$glue_log" >&2
    cat "$LOG_DIR/glue_$(basename "${files[$i]}").log" >&2
  else
    echo "cuda gate: glue compiles: ${files[$i]}" | tee -a "$glue_log"
  fi
done
# Link check without linking (no CUDA torch here): every oclear::cuda:: function the glue calls must be
# defined, with the same signature, by a kernel object or another glue object.
if [[ $status -eq 0 ]]; then
  defined=$(find "$build" -name "*.o" -print0 | xargs -0 nm -C --defined-only 2>/dev/null | sed -n 's/^[0-9a-f]* [TW] //p' | sort -u)
  missing=$(nm -C -u "$build"/glue/*.o 2>/dev/null | sed -n 's/^ *U //p' | grep -E '^oclear::(cuda|sm90)::' | sort -u |
            while read -r sym; do grep -qxF "$sym" <<< "$defined" || echo "$sym"; done)
  if [[ -n "$missing" ]]; then
    status=1
    echo "cuda gate: the glue calls CUDA launchers that no kernel object defines (signature mismatch?):" | tee -a "$glue_log" >&2
    echo "$missing" | tee -a "$glue_log" >&2
  else
    echo "cuda gate: every oclear::cuda:: and oclear::sm90:: symbol the glue uses is defined by the kernel objects" | tee -a "$glue_log"
  fi
fi
echo "cuda gate: done in $(( $(date +%s) - start )) s (logs in $LOG_DIR)"
exit $status
