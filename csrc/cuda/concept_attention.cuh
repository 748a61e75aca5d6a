// CUDA concept attention launchers: raw pointers, sizes, strides and a stream, no torch headers
// (the .cu compiles standalone with nvcc; csrc/ops/concept_attention.cpp is the torch glue).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace oclear::cuda {

enum class AttentionDtype { kFloat32, kBFloat16, kFloat16 };

// q (B, H, Lq, Dh), k and v (B or 1, H, Lk, Dh), each with a contiguous last dimension and the given
// element strides of (batch, head, row); batch stride 0 for a memory shared by the batch.
struct AttentionArgs {
  int64_t batch, heads, lq, lk, dh;
  bool kv_broadcast;
  const void* q;
  const void* k;
  const void* v;
  int64_t q_strides[3], k_strides[3], v_strides[3];
  const bool* mask;  // contiguous (B, Lk), true = padding; null = none
  float scale;
  AttentionDtype dtype;
  // Run the tensor-core (WMMA) kernels where they apply (concept_attention_tc_support). The glue sets
  // it for the op's backend="tensor_core" after checking that they apply (and raising if not); the
  // default (CUDA-core kernels) is what has been verified on a GPU.
  bool tensor_cores = false;
};

// Backward buffers. grad_out and out contiguous (B, H, Lq, Dh); lse, delta (B, H, Lq) float32
// (delta is scratch); grad_q, grad_k, grad_v contiguous outputs in the input dtype, null when not
// needed; acc_k, acc_v zero-initialised float32 (H, Lk, Dh) accumulators when k, v broadcast.
struct AttentionGrads {
  const void* grad_out;
  const void* out;
  const float* lse;
  float* delta;
  void* grad_q;
  void* grad_k;
  void* grad_v;
  float* acc_k;
  float* acc_v;
};

// out (B, H, Lq, Dh) contiguous in the input dtype, lse (B, H, Lq) float32. Lq, Lk >= 1, Dh <= 256.
cudaError_t concept_attention_forward(const AttentionArgs& args, void* out, float* lse, cudaStream_t stream);

cudaError_t concept_attention_backward(const AttentionArgs& args, const AttentionGrads& grads, cudaStream_t stream);

// The tensor-core path (concept_attention_tc.cu): bfloat16 / float16, Dh in {16, 32, 64}, whole key rows
// (Lk <= 256, within 200 KiB of shared memory) in shared memory. The two launchers above call it when
// args.tensor_cores is set and concept_attention_tc_eligible says it applies.
// Why it does not apply, so that the glue can name the problem (kSupported: it applies).
enum class TcSupport {
  kSupported,
  kDtype,         // float32 (the WMMA kernels take bfloat16 / float16)
  kHeadDim,       // Dh not in {16, 32, 64}
  kKeyCount,      // Lk > 256 (or Lq, Lk < 1: nothing to launch)
  kSharedMemory,  // the whole key rows do not fit the current device's per-block shared memory
  kArchitecture,  // the current device is older than sm_80, or this build has no sm_80+ code for it
  kDeviceQuery,   // a CUDA device query failed
};
TcSupport concept_attention_tc_support(const AttentionArgs& args);
inline bool concept_attention_tc_eligible(const AttentionArgs& args) {
  return concept_attention_tc_support(args) == TcSupport::kSupported;
}
cudaError_t concept_attention_forward_tc(const AttentionArgs& args, void* out, float* lse, cudaStream_t stream);
cudaError_t concept_attention_backward_tc(const AttentionArgs& args, const AttentionGrads& grads, cudaStream_t stream);

}  // namespace oclear::cuda
