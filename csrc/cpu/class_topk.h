// CPU kernel of the hardest-class scoring op (see class_topk.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace oclear::cpu {

// Per class c of `weight`, score_c = max over rows i of cos(x_i, w_c); returns the k best classes that
// are not in `exclude` (sorted class ids of this weight block), best first: (scores (k,) acc dtype,
// class ids (k,) int64, local to the block). class_chunk: classes per chunk (0 = automatic).
std::tuple<at::Tensor, at::Tensor> class_topk(const at::Tensor& embeddings, const at::Tensor& weight,
                                              const at::Tensor& exclude, int64_t k, int64_t class_chunk = 0);

}  // namespace oclear::cpu
