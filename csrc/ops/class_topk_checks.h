// Argument checks of the hardest-class scoring op, defined in class_topk.cpp and shared by the CPU
// and CUDA registrations (class_topk_cuda.cpp), so both backends reject the same inputs alike.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

namespace oclear {

// Shapes, dtypes, devices and k; `exclude`'s values (ids in range, sorted, unique) are checked here
// only when it lives on the CPU (the CUDA glue checks them on the device).
void check_class_topk(const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& exclude,
                      int64_t k, int64_t class_chunk);

// The backend argument ("auto", "chunked", "cutlass_sm90"); true for the fused CUTLASS scoring, which
// needs CUDA tensors (the CUDA glue checks the rest).
bool check_class_topk_backend(c10::string_view backend, const at::Tensor& embeddings);

}  // namespace oclear
