// Instantiations of the CPU epilogues. The float ones are the hot path: on x86-64 Linux they are
// compiled for AVX-512, AVX2+FMA and the baseline, and the loader picks the best the CPU has
// (GCC/Clang target_clones), so a wheel built for any x86-64 machine still runs 16-wide.
#include "margin_softmax_epilogue.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define OCLEAR_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OCLEAR_ISA_CLONES
#endif

namespace oclear::cpu {

OCLEAR_ISA_CLONES
void forward_tile(float* tile, int64_t n, int64_t t, const float* w_inv, const int64_t* labels,
                  int64_t tile_class0, int64_t ignore_index, const MarginParams<float>& p,
                  float* target_out, SoftmaxState<float>* states) {
  forward_tile_impl(tile, n, t, w_inv, labels, tile_class0, ignore_index, p, target_out, states);
}

void forward_tile(double* tile, int64_t n, int64_t t, const double* w_inv, const int64_t* labels,
                  int64_t tile_class0, int64_t ignore_index, const MarginParams<double>& p,
                  double* target_out, SoftmaxState<double>* states) {
  forward_tile_impl(tile, n, t, w_inv, labels, tile_class0, ignore_index, p, target_out, states);
}

OCLEAR_ISA_CLONES
void backward_tile(float* tile, int64_t n, int64_t t, const float* w_inv, const int64_t* labels,
                   int64_t tile_class0, int64_t ignore_index, const MarginParams<float>& p,
                   const float* lse, const float* grad_lse, const float* grad_target) {
  backward_tile_impl(tile, n, t, w_inv, labels, tile_class0, ignore_index, p, lse, grad_lse,
                     grad_target);
}

void backward_tile(double* tile, int64_t n, int64_t t, const double* w_inv, const int64_t* labels,
                   int64_t tile_class0, int64_t ignore_index, const MarginParams<double>& p,
                   const double* lse, const double* grad_lse, const double* grad_target) {
  backward_tile_impl(tile, n, t, w_inv, labels, tile_class0, ignore_index, p, lse, grad_lse,
                     grad_target);
}

}  // namespace oclear::cpu
