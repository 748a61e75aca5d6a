#!/usr/bin/env bash
# Everything a lent GPU machine should check, in one call, from the repository root:
#
#   benchmarks/gpu_check.sh                     # all phases, in priority order: build test bench sanitize
#                                               # attention train profile
#   benchmarks/gpu_check.sh build test          # some phases (a warm machine keeps the install)
#   OUT=/path benchmarks/gpu_check.sh           # where logs and JSON go (default ./gpu_out)
#
# Phases (each writes its log under $OUT; a failing phase is reported and the next ones still run;
# each is bounded by a timeout so that one hang cannot eat a lease):
#   build     pip install --no-build-isolation --no-deps . against this machine's torch (CUDA kernels
#             for the visible GPU's architecture, Hopper as 9.0a with the fused CUTLASS kernels, whose
#             headers come from the nvidia-cutlass wheel: installed first, with the benchmark's peers, from
#             .whl/ when carried there, see benchmarks/fetch_gpu_wheels.sh); the extension is copied to $OUT
#             -> build.log
#   test      the CUDA tests (python_tests/test_*_cuda.py; GPU_CHECK_TESTS overrides), in parallel
#             processes when pytest-xdist is there, run from $OUT so the installed package is imported
#             rather than the source tree (the CPU suite is CI's job)           -> tests.log, tests.xml
#   attention benchmarks/bench_concept_attention.py --device cuda (bf16, the fusion's shapes, the
#             target shape first)                                                    -> attention.log, *.json, *.png
#   train     oclear-train on the built-in emoji data on the GPU (small encoders, fusion on, bf16
#             autocast): the training loop's own samples/s                      -> train.log, train/
#   sanitize  compute-sanitizer memcheck, racecheck, initcheck and synccheck on small calls of every
#             CUDA kernel (benchmarks/cuda_sanitizer_calls.py)                 -> sanitizer_<tool>.log
#   bench     benchmarks/bench_margin_softmax.py --device cuda (bf16, N=1024, D=512,
#             C in {65536, 262144, 1048576, 4194304}: default and cutlass_sm90 backends vs reference vs
#             three bf16 GEMMs vs linear_cross_entropy / cut-cross-entropy (default and filter_eps=None) /
#             Liger when present, gradients against float64 at the first size), then at C = 1M: N = 4096,
#             D = 256 and D = 1024, and a sweep of the chunked glue's classes-per-chunk
#             -> bench.log, bench_n4096.log, bench_d256.log, bench_d1024.log, bench_chunk_sweep.log, *.json, *.png
#   profile   benchmarks/profile_cuda.py: torch.profiler kernel tables (attention, margin softmax) -> profile.log
# Phase times of the last GPU run (benchmarks/results/gpu_h100_2026-11-25/; MAX_JOBS=16, arch 9.0, before
# the CUTLASS kernels, which add about 2 min of nvcc for one file), for sizing GPU_CHECK_SECONDS: build 90-100 s, test 50 s,
# attention 25 s, train 17 s, sanitize 66-117 s, bench 27 s, profile ~15 s (then: CUDA-core attention only).
# GPU_CHECK_SECONDS=N bounds the whole run: each phase's timeout is cut to what is left, and a phase
# with under 15 s left is skipped (said so in the summary), so that a lease ends with logs, not a kill.
# $OUT/summary.txt lists each phase's status and time.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PHASES=("$@")
[[ ${#PHASES[@]} -eq 0 ]] && PHASES=(build test bench sanitize attention train profile)
PY=${PYTHON:-python}
SUMMARY="$OUT/summary.txt"

note() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }
phase_result() {  # name, exit status, seconds
  if [[ $2 -eq 0 ]]; then note "$1: OK ($3 s)"; else note "$1: FAILED (exit $2, $3 s; see its log in $OUT)"; FAILED=1; fi
}
FAILED=0
DEADLINE=${GPU_CHECK_SECONDS:+$(( $(date +%s) + GPU_CHECK_SECONDS ))}
limit() {  # a phase's own cap in seconds -> its timeout, cut to the time left before the deadline
  local cap=$1 left
  if [[ -n $DEADLINE ]]; then left=$(( DEADLINE - $(date +%s) )); (( left < cap )) && cap=$left; fi
  echo "$cap"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown) $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo dirty)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || true
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None, 'capability', torch.cuda.get_device_capability() if torch.cuda.is_available() else None)" 2>&1
  "$PY" -c "import pytest, hypothesis; print('pytest', pytest.__version__, 'hypothesis', hypothesis.__version__)" 2>&1 || echo "pytest/hypothesis missing: the test phase cannot run"
} > "$OUT/environment.txt"
note "phases: ${PHASES[*]}; environment in $OUT/environment.txt"

run_build() {
  # Carried wheels (benchmarks/fetch_gpu_wheels.sh): the CUTLASS headers and the benchmark's peers, pure Python,
  # installed without their dependencies (torch and triton are on the GPU machine).
  if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps "$REPO"/.whl/*.whl > "$OUT/build.log" 2>&1
  fi
  (cd "$REPO" && timeout "$(limit 420)" "$PY" -m pip install --no-build-isolation --no-deps -v . ) >> "$OUT/build.log" 2>&1 || return $?
  (cd "$OUT" && "$PY" -c "import oclear_ext, json, shutil, torch; print(json.dumps(oclear_ext.build_info)); assert oclear_ext.build_info['with_cuda'], 'built without CUDA kernels'; assert oclear_ext.build_info['fused_sm90'] or torch.cuda.get_device_capability() != (9, 0), 'an sm_90 GPU but no fused kernels: ' + oclear_ext.build_info['fused_sm90_reason']; import importlib; print('extension', shutil.copy(importlib.import_module('oclear_ext._C').__file__, '.'))") >> "$OUT/build.log" 2>&1
}

run_test() {
  local tests parallel=()
  # shellcheck disable=SC2206
  tests=(${GPU_CHECK_TESTS:-$REPO/python_tests/test_*_cuda.py $REPO/python_tests/test_autocast.py})
  "$PY" -c "import xdist" 2> /dev/null && parallel=(-n 8)
  # From $OUT: `import oclear_ext` must find the installed package, not the unbuilt source tree.
  (cd "$OUT" && timeout "$(limit 300)" "$PY" -m pytest "${tests[@]}" "${parallel[@]}" -q -rs -p no:cacheprovider \
     --junitxml="$OUT/tests.xml") > "$OUT/tests.log" 2>&1
}

run_attention() {
  (cd "$OUT" && timeout "$(limit 150)" "$PY" "$REPO/benchmarks/bench_concept_attention.py" --device cuda --repeats 30 \
     --out "$OUT") > "$OUT/attention.log" 2>&1
}

run_train() {
  (cd "$OUT" && timeout "$(limit 120)" "$PY" -m oclear_ext.train --train-manifest builtin:emoji --device cuda --epochs 3 \
     --batch-size 256 --num-workers 4 --log-every 10 --no-progress --out-dir "$OUT/train") > "$OUT/train.log" 2>&1
}

find_sanitizer() {
  command -v compute-sanitizer && return 0
  local top
  top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  for c in "${CUDA_HOME:-}/bin/compute-sanitizer" "$top/bin/compute-sanitizer" "$top/../compute-sanitizer/compute-sanitizer" \
           /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [[ -x "$c" ]] && { echo "$c"; return 0; }
  done
  return 1
}

run_sanitize() {
  local san status=0 tool filter
  if ! san=$(find_sanitizer); then
    echo "compute-sanitizer not found (PATH, CUDA_HOME, nvcc's toolkit)" > "$OUT/sanitizer_memcheck.log"
    return 1
  fi
  for tool in memcheck racecheck initcheck synccheck; do
    filter=()
    # memcheck sees every kernel (our arguments to cuBLAS included); the other tools only ours.
    if [[ $tool != memcheck ]] && "$san" --help 2>&1 | grep -q -- "--kernel-name"; then
      filter=(--kernel-name kns=oclear)
    fi
    # No caching allocator: every tensor is its own allocation, so an overrun is an overrun.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(limit 100)" "$san" --tool "$tool" "${filter[@]}" --error-exitcode 99 \
      "$PY" "$REPO/benchmarks/cuda_sanitizer_calls.py" > "$OUT/sanitizer_$tool.log" 2>&1
    local rc=$?
    echo "$tool: exit $rc ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -n 1))" >> "$OUT/sanitizer_summary.txt"
    [[ $rc -ne 0 ]] && status=$rc
  done
  return $status
}

run_bench() {
  local bench=("$PY" "$REPO/benchmarks/bench_margin_softmax.py" --device cuda --out "$OUT")
  (cd "$OUT" && timeout "$(limit 300)" "${bench[@]}") > "$OUT/bench.log" 2>&1 || return $?
  (cd "$OUT" && timeout "$(limit 90)" "${bench[@]}" --sizes 1048576 --n 4096 --no-gradient-check --tag _n4096) > "$OUT/bench_n4096.log" 2>&1
  (cd "$OUT" && timeout "$(limit 90)" "${bench[@]}" --sizes 1048576 --d 256 --no-gradient-check --tag _d256) > "$OUT/bench_d256.log" 2>&1
  (cd "$OUT" && timeout "$(limit 90)" "${bench[@]}" --sizes 1048576 --d 1024 --no-gradient-check --tag _d1024) > "$OUT/bench_d1024.log" 2>&1
  # The classes-per-chunk default of the CUDA glue comes from this sweep at C = 1M: re-check it.
  (cd "$OUT" && timeout "$(limit 200)" "$PY" "$REPO/benchmarks/bench_margin_softmax.py" --device cuda --out "$OUT" --sizes 1048576 \
     --chunks 2048 4096 8192 16384 32768 65536 --tag _chunk_sweep) > "$OUT/bench_chunk_sweep.log" 2>&1
}

run_profile() {
  (cd "$OUT" && timeout "$(limit 90)" "$PY" "$REPO/benchmarks/profile_cuda.py") > "$OUT/profile.log" 2>&1
}

for phase in "${PHASES[@]}"; do
  case $phase in
    build|test|attention|train|sanitize|bench|profile) ;;
    *) note "unknown phase '$phase' (expected build, test, attention, train, sanitize, bench, profile)"; exit 2 ;;
  esac
  if (( $(limit 15) < 15 )); then note "$phase: SKIPPED (GPU_CHECK_SECONDS spent)"; FAILED=1; continue; fi
  start=$(date +%s)
  note "$phase: started"
  "run_$phase"
  phase_result "$phase" $? $(( $(date +%s) - start ))
done
[[ -f "$OUT/sanitizer_summary.txt" ]] && cat "$OUT/sanitizer_summary.txt" | tee -a "$SUMMARY"
[[ -f "$OUT/tests.log" ]] && tail -n 3 "$OUT/tests.log" | tee -a "$SUMMARY"
note "done: $([[ $FAILED -eq 0 ]] && echo 'all phases passed' || echo 'some phases FAILED'); logs and JSON in $OUT"
exit $FAILED
