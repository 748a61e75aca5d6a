// CUTLASS's can_implement on the fused backend's shapes, without a GPU: built and run by CI's CUDA gate
// (CMakeLists.txt under OCLEAR_CUDA_GATE, .ci/cuda_gate.sh), linked with the sm_90a kernels' object. Every
// shape the GPU tests, the sanitizer calls and the benchmark send, class counts that are not multiples of 8
// included, must be accepted by the GEMMs the glue runs for it (margin_softmax_sm90.cuh's refusing_gemm); a D
// that is not a multiple of 8, which the glue refuses by name, must be one CUTLASS refuses too.
#include <cstdint>
#include <string>

#include "../cuda_sm90/margin_softmax_sm90.cuh"
#include "unit_check.h"

namespace {

struct Shape {
  int64_t n, classes, d;
};

const Shape kSupported[] = {
    // benchmarks/bench_margin_softmax.py (benchmarks/gpu_check.sh's runs)
    {1024, 65536, 512}, {1024, 262144, 512}, {1024, 1048576, 512}, {1024, 4194304, 512},
    {4096, 1048576, 512}, {1024, 1048576, 256}, {1024, 1048576, 1024},
    // python_tests/test_margin_softmax_fused_cuda.py
    {1, 300, 64}, {200, 1000, 128}, {5, 7, 64}, {1024, 70000, 512}, {300, 2000, 256}, {333, 5000, 128},
    {8, 3000, 64}, {257, 1111, 128}, {257, 1889, 128}, {512, 20000, 256}, {300, 5003, 128}, {64, 1000, 64},
    {500, 30000, 256}, {8, 100, 64},
    // benchmarks/cuda_sanitizer_calls.py
    {130, 700, 64}, {1, 300, 8}, {1, 3, 8}, {257, 1000, 136},
};

}  // namespace

int main() {
  using oclear::sm90::refusing_gemm;
  CHECK_MSG(oclear::sm90::kernels_built(), "the gate links the sm_90a kernels");
  for (const Shape& s : kSupported) {
    const std::string gemm = refusing_gemm(s.n, s.classes, s.d);
    CHECK_MSG(gemm.empty(), "N = " << s.n << ", C = " << s.classes << ", D = " << s.d << ": the " << gemm
                                    << " GEMM refuses it");
  }
  CHECK_MSG(!std::string(refusing_gemm(200, 1000, 60)).empty(), "D = 60 is accepted: the glue's D rule is stricter");
  return unit_check::finish();
}
