// Fused margin-softmax GEMMs for Hopper on CUTLASS 3 (interface and conventions:
// margin_softmax_sm90.cuh; math: csrc/include/oclear/fused_margin.h).
//
// Five kernels, each a TMA warp-specialised cooperative bf16 GEMM (float32 accumulation, 128 x 256 x 64
// CTA tiles, clusters of 2 along M) with an epilogue visitor tree (EVT):
//   forward    S = x^ W^T, epilogue: shifted_exp -> per-(row, class tile) sums; nothing else is stored.
//   forward, store-E   the same, and E' = stored_exp(...) stored in bf16 for a backward without recompute.
//   class max  S = x^ W^T, epilogue: per-(row tile, class) max (hardest_classes' scores); nothing stored.
//   recompute  S = x^ W_chunk^T, same tiles, epilogue: recompute_grad -> bf16 B stored, and per-(row tile,
//              class) sums of projection_term(B, S) for the weight projection.
//   weight     E = B^T x^, epilogue: fma(beta_c, w_c, E_c) -> bf16 dW: the projection without E in memory.
// The reductions write partials (FinalReduction = false) that small kernels merge in a fixed order, so
// results do not depend on CTA scheduling (no atomics).
//
// Built only for sm_90a (wgmma and TMA need the "a" feature set); setup.py adds this file when 9.0a is in
// TORCH_CUDA_ARCH_LIST and defines OCLEAR_WITH_SM90A. Device passes for other architectures see CUTLASS's
// own arch guards and compile empty kernel bodies, which dispatch never launches (kernels_built() and the
// device's compute capability, checked by the glue).
// CUTLASS's device-side assert()s (k_tile_count >= 1 in the mainloop, ...) compile to calls of __assertfail,
// and ptxas then serialises every wgmma of the kernel around the call (warning C7510): a release build
// of these kernels has no asserts, whatever the build system passes. Before any include.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "margin_softmax_sm90.cuh"

#if defined(OCLEAR_WITH_SM90A)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "margin_softmax_sm90.cu must be compiled for sm_90a (TORCH_CUDA_ARCH_LIST=9.0a): plain sm_90 builds empty kernels"
#endif

#include <oclear/fused_margin.h>

#include <cmath>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace oclear::sm90 {
namespace {

using namespace cute;
namespace fus = cutlass::epilogue::fusion;

using Bf16 = cutlass::bfloat16_t;
using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_2, _1, _1>;
static_assert(size<0>(TileShape{}) == kTileRows && size<1>(TileShape{}) == kTileClasses);
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

fused::ShiftParams to_params(const ShiftArgs& a) { return {a.k, a.filtered, a.has_filter, a.filter}; }

// ---- element functors (Array<float, N> in, Array<float, N> out); the float specialisations only carry the
// Arguments type, which CUTLASS reads from ComputeFn<ElementCompute> ----

template <class T>
struct ShiftedExp {
  using Arguments = fused::ShiftParams;
  CUTLASS_DEVICE T operator()(T const& acc, T const& w_inv, T const& class_id, T const& label_col,
                              Arguments const& p) const {
    T out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) out[i] = fused::shifted_exp(acc[i], w_inv[i], class_id[i] == label_col[i], p);
    return out;
  }
};
template <>
struct ShiftedExp<float> {
  using Arguments = fused::ShiftParams;
};

template <class T>
struct RecomputeGrad {
  using Arguments = fused::ShiftParams;
  CUTLASS_DEVICE T operator()(T const& acc, T const& w_inv, T const& class_id, T const& label_col, T const& lse2,
                              T const& gs, T const& gt, Arguments const& p) const {
    T out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) {
      out[i] = fused::recompute_grad(acc[i], w_inv[i], class_id[i] == label_col[i], lse2[i], gs[i], gt[i], p);
    }
    return out;
  }
};
template <>
struct RecomputeGrad<float> {
  using Arguments = fused::ShiftParams;
};

// Store-E forward: E' = stored_exp(E, acc, w_inv), kept in bf16 for the backward.
template <class T>
struct StoredExp {
  using Arguments = fused::ShiftParams;
  CUTLASS_DEVICE T operator()(T const& e, T const& acc, T const& w_inv, Arguments const& p) const {
    T out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) out[i] = fused::stored_exp(e[i], acc[i], w_inv[i], p);
    return out;
  }
};
template <>
struct StoredExp<float> {
  using Arguments = fused::ShiftParams;
};

// projection_term of the value the store rounds B to (the dW GEMM reads that value back).
template <class T>
struct ProjectionTerm {
  CUTLASS_DEVICE T operator()(T const& grad, T const& acc) const {
    T out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) out[i] = fused::projection_term(fused::round_to_bf16(grad[i]), acc[i]);
    return out;
  }
};

// The DAG's output node: passes B through to the store once the reduction branch has been visited.
template <class T>
struct FirstOf {
  CUTLASS_DEVICE T operator()(T const& a, T const&) const { return a; }
};

// dW epilogue: fma(beta_c, w_c, E_c), the weight-norm projection (fused_margin.h: projection_coefficient).
template <class T>
struct ProjectedWeightGrad {
  CUTLASS_DEVICE T operator()(T const& beta, T const& w, T const& acc) const {
    T out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) out[i] = fmaf(beta[i], w[i], acc[i]);
    return out;
  }
};

// ---- visitor trees ----

using ClassVec = fus::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;  // one value per class
using RowVec = fus::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;    // one value per row

using ForwardExp = fus::Sm90EVT<fus::Sm90Compute<ShiftedExp, float, float, kRound>, fus::Sm90AccFetch, ClassVec,
                                ClassVec, RowVec>;
using RowSums = fus::Sm90ColReduction<cutlass::plus, cutlass::plus, cutlass::plus, 0, TileShape, float, float, kRound,
                                      Stride<_1, _0, int64_t>, 4, true, /*FinalReduction=*/false>;
// A void D makes the epilogue builder look up an aux element type on the root node; give it one (unused).
struct RowSumsRoot : RowSums {
  using RowSums::RowSums;
  using ElementAux = Bf16;
};
using ForwardEVT = fus::Sm90EVT<RowSumsRoot, ForwardExp>;

// Store-E forward, nodes in topological order: 0 acc, 1 w_inv, 2 class id, 3 label column, 4 shifted_exp,
// 5 row sums of 4, 6 stored_exp(4, 0, 1), 7 output E' (after 5).
using ForwardStoreEVT = fus::Sm90TopologicalVisitor<
    float,
    cute::tuple<cute::seq<>, cute::seq<>, cute::seq<>, cute::seq<>, cute::seq<0, 1, 2, 3>, cute::seq<4>,
                cute::seq<4, 0, 1>, cute::seq<6, 5>>,
    fus::Sm90AccFetch, ClassVec, ClassVec, RowVec, fus::Sm90Compute<ShiftedExp, float, float, kRound>, RowSums,
    fus::Sm90Compute<StoredExp, float, float, kRound>, fus::Sm90Compute<FirstOf, Bf16, float, kRound>>;

using ClassSums = fus::Sm90RowReduction<cutlass::plus, cutlass::plus, cutlass::plus, 0, TileShape, float, float, kRound,
                                        Stride<_0, _1, int64_t>, 4, true, /*FinalReduction=*/false>;
// hardest_classes scoring: per (row tile, class) the max of x^ . w_c over the tile's rows. fmaxf skips NaN
// (a NaN row never wins a column, as in the chunked path; an all-NaN column stays at the identity -inf).
using ClassMax = fus::Sm90RowReduction<cutlass::maximum_with_default_nan_propagation,
                                       cutlass::maximum_with_default_nan_propagation,
                                       cutlass::maximum_with_default_nan_propagation, 0, TileShape, float, float,
                                       kRound, Stride<_0, _1, int64_t>, 4, true, /*FinalReduction=*/false>;
struct ClassMaxRoot : ClassMax {
  using ClassMax::ClassMax;
  using ElementAux = Bf16;  // see RowSumsRoot
};
using ClassMaxEVT = fus::Sm90EVT<ClassMaxRoot, fus::Sm90AccFetch>;

// Nodes in topological order: 0 acc, 1 w_inv, 2 class id, 3 label column, 4 lse2, 5 gs, 6 gt,
// 7 B = recompute_grad(0..6), 8 projection_term(7, 0), 9 class sums of 8, 10 output B (after 9).
using RecomputeEVT = fus::Sm90TopologicalVisitor<
    float,
    cute::tuple<cute::seq<>, cute::seq<>, cute::seq<>, cute::seq<>, cute::seq<>, cute::seq<>, cute::seq<>,
                cute::seq<0, 1, 2, 3, 4, 5, 6>, cute::seq<7, 0>, cute::seq<8>, cute::seq<7, 9>>,
    fus::Sm90AccFetch, ClassVec, ClassVec, RowVec, RowVec, RowVec, RowVec,
    fus::Sm90Compute<RecomputeGrad, float, float, kRound>, fus::Sm90Compute<ProjectionTerm, float, float, kRound>,
    ClassSums, fus::Sm90Compute<FirstOf, Bf16, float, kRound>>;

// dW: the GEMM's rows are classes; beta is one value per GEMM row, w the C operand.
using ProjectedEVT = fus::Sm90EVT<fus::Sm90Compute<ProjectedWeightGrad, Bf16, float, kRound>,
                                  RowVec, fus::Sm90SrcFetch<Bf16>, fus::Sm90AccFetch>;

template <class LayoutA, class LayoutB, class ElementC, class ElementD, class EVT>
struct Gemm {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, cutlass::layout::RowMajor, 8, ElementD,
      cutlass::layout::RowMajor, 8, cutlass::epilogue::TmaWarpSpecializedCooperative, EVT>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Bf16, LayoutA, 8, Bf16, LayoutB, 8, float, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Op = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// x^ (rows x d, d contiguous) times w^T (w: classes x d, d contiguous: K-major B).
using ForwardGemm = Gemm<cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, void, void, ForwardEVT>::Op;
using ForwardStoreGemm = Gemm<cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, void, Bf16, ForwardStoreEVT>::Op;
using RecomputeGemm = Gemm<cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, void, Bf16, RecomputeEVT>::Op;
using ClassMaxGemm = Gemm<cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, void, void, ClassMaxEVT>::Op;
// B^T (B: rows x t with leading dimension ld: an M-major A) times x^ (rows x d: an N-major B).
using WeightGemm = Gemm<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, Bf16, Bf16, ProjectedEVT>::Op;

template <class Op>
typename Op::Arguments logit_arguments(int64_t n, int64_t classes, int64_t d, const void* x_hat, const void* w) {
  using K = typename Op::GemmKernel;
  typename Op::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {static_cast<int>(n), static_cast<int>(classes), static_cast<int>(d), 1};
  args.mainloop.ptr_A = static_cast<const Bf16*>(x_hat);
  args.mainloop.dA = cutlass::make_cute_packed_stride(typename K::StrideA{}, {static_cast<int>(n), static_cast<int>(d), 1});
  args.mainloop.ptr_B = static_cast<const Bf16*>(w);
  args.mainloop.dB =
      cutlass::make_cute_packed_stride(typename K::StrideB{}, {static_cast<int>(classes), static_cast<int>(d), 1});
  return args;
}

template <class Op>
int run(Op& op, typename Op::Arguments const& args, void* workspace, cudaStream_t stream) {
  cutlass::Status s = op.can_implement(args);
  if (s != cutlass::Status::kSuccess) return 100 + static_cast<int>(s);
  s = op.initialize(args, workspace, stream);
  if (s != cutlass::Status::kSuccess) return 200 + static_cast<int>(s);
  s = op.run(stream);
  return s == cutlass::Status::kSuccess ? 0 : 300 + static_cast<int>(s);
}

typename ForwardGemm::Arguments forward_arguments(int64_t n, int64_t classes, int64_t d, const void* x_hat,
                                                  const void* w, const float* w_inv, const float* class_id,
                                                  const float* label_col, const ShiftArgs& shift, float* partial) {
  auto args = logit_arguments<ForwardGemm>(n, classes, d, x_hat, w);
  auto& tree = args.epilogue.thread;  // EVT arguments: children first, then the node (a tuple past 4 ops)
  cute::get<1>(tree.op_0).ptr_row = w_inv;
  cute::get<2>(tree.op_0).ptr_row = class_id;
  cute::get<3>(tree.op_0).ptr_col = label_col;
  cute::get<4>(tree.op_0) = to_params(shift);
  tree.op_1.ptr_col = partial;
  return args;
}

typename ForwardStoreGemm::Arguments forward_store_arguments(int64_t n, int64_t classes, int64_t d, const void* x_hat,
                                                             const void* w, const float* w_inv, const float* class_id,
                                                             const float* label_col, const ShiftArgs& shift,
                                                             float* partial, void* stored, int64_t ld_stored) {
  auto args = logit_arguments<ForwardStoreGemm>(n, classes, d, x_hat, w);
  args.epilogue.ptr_D = static_cast<Bf16*>(stored);
  auto stride_d = cutlass::make_cute_packed_stride(typename ForwardStoreGemm::GemmKernel::StrideD{},
                                                   {static_cast<int>(n), static_cast<int>(classes), 1});
  cute::get<0>(stride_d) = ld_stored;
  args.epilogue.dD = stride_d;
  auto& dag = args.epilogue.thread;
  cute::get<1>(dag).ptr_row = w_inv;
  cute::get<2>(dag).ptr_row = class_id;
  cute::get<3>(dag).ptr_col = label_col;
  cute::get<4>(dag) = to_params(shift);
  cute::get<5>(dag).ptr_col = partial;
  cute::get<6>(dag) = to_params(shift);
  return args;
}

typename ClassMaxGemm::Arguments class_max_arguments(int64_t n, int64_t classes, int64_t d, const void* x_hat,
                                                     const void* w, float* partial) {
  auto args = logit_arguments<ClassMaxGemm>(n, classes, d, x_hat, w);
  args.epilogue.thread.op_1.ptr_row = partial;
  args.epilogue.thread.op_1.reduction_identity = -INFINITY;
  return args;
}

typename RecomputeGemm::Arguments recompute_arguments(int64_t n, int64_t t, int64_t d, const void* x_hat,
                                                      const void* w, const float* w_inv, const float* class_id,
                                                      const float* label_col, const float* lse2, const float* gs,
                                                      const float* gt, const ShiftArgs& shift, void* ds,
                                                      int64_t ld_ds, float* r_partial) {
  auto args = logit_arguments<RecomputeGemm>(n, t, d, x_hat, w);
  args.epilogue.ptr_D = static_cast<Bf16*>(ds);
  auto stride_d = cutlass::make_cute_packed_stride(typename RecomputeGemm::GemmKernel::StrideD{},
                                                   {static_cast<int>(n), static_cast<int>(t), 1});
  cute::get<0>(stride_d) = ld_ds;
  args.epilogue.dD = stride_d;
  auto& dag = args.epilogue.thread;  // one Arguments per node, in topological order
  cute::get<1>(dag).ptr_row = w_inv;
  cute::get<2>(dag).ptr_row = class_id;
  cute::get<3>(dag).ptr_col = label_col;
  cute::get<4>(dag).ptr_col = lse2;
  cute::get<5>(dag).ptr_col = gs;
  cute::get<6>(dag).ptr_col = gt;
  cute::get<7>(dag) = to_params(shift);
  cute::get<9>(dag).ptr_row = r_partial;
  return args;
}

typename WeightGemm::Arguments weight_arguments(int64_t t, int64_t n, int64_t d, const void* ds, int64_t ld_ds,
                                                const void* x_hat, const void* w, const float* beta, void* grad_w) {
  using K = typename WeightGemm::GemmKernel;
  typename WeightGemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {static_cast<int>(t), static_cast<int>(d), static_cast<int>(n), 1};
  args.mainloop.ptr_A = static_cast<const Bf16*>(ds);
  auto stride_a = cutlass::make_cute_packed_stride(typename K::StrideA{}, {static_cast<int>(t), static_cast<int>(n), 1});
  cute::get<1>(stride_a) = ld_ds;  // M-major: column k (a row i of B) starts ld_ds elements after column k - 1
  args.mainloop.dA = stride_a;
  args.mainloop.ptr_B = static_cast<const Bf16*>(x_hat);
  args.mainloop.dB = cutlass::make_cute_packed_stride(typename K::StrideB{}, {static_cast<int>(d), static_cast<int>(n), 1});
  const auto stride_cd = cutlass::make_cute_packed_stride(typename K::StrideC{}, {static_cast<int>(t), static_cast<int>(d), 1});
  args.epilogue.ptr_C = static_cast<const Bf16*>(w);
  args.epilogue.dC = stride_cd;
  args.epilogue.ptr_D = static_cast<Bf16*>(grad_w);
  args.epilogue.dD = cutlass::make_cute_packed_stride(typename K::StrideD{}, {static_cast<int>(t), static_cast<int>(d), 1});
  auto& tree = args.epilogue.thread;
  tree.op_0.ptr_col = beta;
  return args;
}

}  // namespace

bool kernels_built() { return true; }

const char* refusing_gemm(int64_t n, int64_t classes, int64_t d) {
  constexpr auto ok = cutlass::Status::kSuccess;
  const int64_t c_gemm = classes / 8 * 8, ld = (classes + 7) / 8 * 8;
  if (ForwardGemm::can_implement(forward_arguments(n, classes, d, nullptr, nullptr, nullptr, nullptr, nullptr, {},
                                                   nullptr)) != ok) {
    return "forward";
  }
  if (ClassMaxGemm::can_implement(class_max_arguments(n, classes, d, nullptr, nullptr, nullptr)) != ok) {
    return "class max";
  }
  if (c_gemm == 0) return "";  // no store-E or backward GEMM runs: CUDA-core kernels take every class
  if (ForwardStoreGemm::can_implement(forward_store_arguments(n, c_gemm, d, nullptr, nullptr, nullptr, nullptr,
                                                              nullptr, {}, nullptr, nullptr, ld)) != ok) {
    return "forward (store-E)";
  }
  for (const int64_t t : {c_gemm < kTileClasses ? c_gemm : kTileClasses, c_gemm}) {
    if (RecomputeGemm::can_implement(recompute_arguments(n, t, d, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                         nullptr, nullptr, {}, nullptr, ld, nullptr)) != ok) {
      return "backward recompute";
    }
    if (WeightGemm::can_implement(weight_arguments(t, n, d, nullptr, ld, nullptr, nullptr, nullptr, nullptr)) != ok) {
      return "weight gradient";
    }
  }
  return "";
}

size_t forward_workspace_size(int64_t n, int64_t classes, int64_t d) {
  return ForwardGemm::get_workspace_size(
      forward_arguments(n, classes, d, nullptr, nullptr, nullptr, nullptr, nullptr, {}, nullptr));
}

int launch_forward(int64_t n, int64_t classes, int64_t d, const void* x_hat, const void* w, const float* w_inv,
                   const float* class_id, const float* label_col, const ShiftArgs& shift, float* partial,
                   void* workspace, cudaStream_t stream) {
  ForwardGemm op;
  return run(op, forward_arguments(n, classes, d, x_hat, w, w_inv, class_id, label_col, shift, partial), workspace,
             stream);
}

size_t forward_store_workspace_size(int64_t n, int64_t classes, int64_t d) {
  return ForwardStoreGemm::get_workspace_size(forward_store_arguments(n, classes, d, nullptr, nullptr, nullptr, nullptr,
                                                                      nullptr, {}, nullptr, nullptr, 8));
}

int launch_forward_store(int64_t n, int64_t classes, int64_t d, const void* x_hat, const void* w, const float* w_inv,
                         const float* class_id, const float* label_col, const ShiftArgs& shift, float* partial,
                         void* stored, int64_t ld_stored, void* workspace, cudaStream_t stream) {
  ForwardStoreGemm op;
  return run(op,
             forward_store_arguments(n, classes, d, x_hat, w, w_inv, class_id, label_col, shift, partial, stored,
                                     ld_stored),
             workspace, stream);
}

size_t recompute_workspace_size(int64_t n, int64_t t, int64_t d) {
  return RecomputeGemm::get_workspace_size(recompute_arguments(n, t, d, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                               nullptr, nullptr, nullptr, {}, nullptr, 8, nullptr));
}

int launch_recompute(int64_t n, int64_t t, int64_t d, const void* x_hat, const void* w, const float* w_inv,
                     const float* class_id, const float* label_col, const float* lse2, const float* gs,
                     const float* gt, const ShiftArgs& shift, void* ds, int64_t ld_ds, float* r_partial,
                     void* workspace, cudaStream_t stream) {
  RecomputeGemm op;
  return run(op,
             recompute_arguments(n, t, d, x_hat, w, w_inv, class_id, label_col, lse2, gs, gt, shift, ds, ld_ds,
                                 r_partial),
             workspace, stream);
}

size_t class_max_workspace_size(int64_t n, int64_t classes, int64_t d) {
  return ClassMaxGemm::get_workspace_size(class_max_arguments(n, classes, d, nullptr, nullptr, nullptr));
}

int launch_class_max(int64_t n, int64_t classes, int64_t d, const void* x_hat, const void* w, float* partial,
                     void* workspace, cudaStream_t stream) {
  ClassMaxGemm op;
  return run(op, class_max_arguments(n, classes, d, x_hat, w, partial), workspace, stream);
}

size_t weight_grad_workspace_size(int64_t t, int64_t n, int64_t d) {
  return WeightGemm::get_workspace_size(weight_arguments(t, n, d, nullptr, 8, nullptr, nullptr, nullptr, nullptr));
}

int launch_weight_grad(int64_t t, int64_t n, int64_t d, const void* ds, int64_t ld_ds, const void* x_hat,
                       const void* w, const float* beta, void* grad_w, void* workspace, cudaStream_t stream) {
  WeightGemm op;
  return run(op, weight_arguments(t, n, d, ds, ld_ds, x_hat, w, beta, grad_w), workspace, stream);
}

}  // namespace oclear::sm90

#else  // a build without the sm_90a kernels: the glue checks kernels_built() before any launch

namespace oclear::sm90 {
bool kernels_built() { return false; }
const char* refusing_gemm(int64_t, int64_t, int64_t) { return "all"; }
size_t forward_workspace_size(int64_t, int64_t, int64_t) { return 0; }
int launch_forward(int64_t, int64_t, int64_t, const void*, const void*, const float*, const float*, const float*,
                   const ShiftArgs&, float*, void*, cudaStream_t) { return -1; }
size_t forward_store_workspace_size(int64_t, int64_t, int64_t) { return 0; }
int launch_forward_store(int64_t, int64_t, int64_t, const void*, const void*, const float*, const float*, const float*,
                         const ShiftArgs&, float*, void*, int64_t, void*, cudaStream_t) { return -1; }
size_t recompute_workspace_size(int64_t, int64_t, int64_t) { return 0; }
int launch_recompute(int64_t, int64_t, int64_t, const void*, const void*, const float*, const float*, const float*,
                     const float*, const float*, const float*, const ShiftArgs&, void*, int64_t, float*, void*,
                     cudaStream_t) { return -1; }
size_t class_max_workspace_size(int64_t, int64_t, int64_t) { return 0; }
int launch_class_max(int64_t, int64_t, int64_t, const void*, const void*, float*, void*, cudaStream_t) { return -1; }
size_t weight_grad_workspace_size(int64_t, int64_t, int64_t) { return 0; }
int launch_weight_grad(int64_t, int64_t, int64_t, const void*, int64_t, const void*, const void*, const float*, void*,
                       void*, cudaStream_t) { return -1; }
}  // namespace oclear::sm90

#endif  // OCLEAR_WITH_SM90A
