// Argument checks of the margin-softmax private ops, defined in margin_softmax.cpp and shared by
// the CPU and CUDA registrations (margin_softmax_cuda.cpp), so both backends reject the same
// inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../cpu/margin_softmax.h"

namespace oclear {

// Shapes, dtypes, devices, the class block, the margins and class_chunk of either op; with
// check_labels, labels are range-checked here when they live on the CPU (the CUDA glue checks them on
// the device, at the cost of one synchronisation).
cpu::MarginSoftmaxArgs check_problem(const at::Tensor& embeddings, const at::Tensor& weight,
                                     const at::Tensor& labels, int64_t class_start,
                                     int64_t num_classes, double scale, double m1, double m2,
                                     double m3, std::optional<double> interclass_filter,
                                     int64_t ignore_index, bool straight_through, int64_t class_chunk,
                                     bool check_labels);

// A (n,) tensor of dtype acc, as the backward op needs for grad_lse, grad_target, lse, w_inv.
void check_row_vector(const at::Tensor& t, int64_t n, at::ScalarType acc, const char* name);

}  // namespace oclear
