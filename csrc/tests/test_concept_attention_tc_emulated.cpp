// The tensor-core concept-attention kernels (csrc/cuda/concept_attention_tc.cu), compiled unchanged as
// C++ against the CPU emulation of CUDA in csrc/tests/cuda_emulation, against a float64 reference of
// the op on the same 16-bit inputs: forward (out, lse), dq, dk, dv for bfloat16 and float16, per-batch
// and shared memories, ragged query and key counts, random padding and a fully padded batch element.
// It checks the kernels' indexing, tiling, shared-memory layout, masking and synchronisation structure
// without a GPU; not their speed, nor what only hardware shows (faults, the hardware's own scheduling).
// Three checks stand in for compute-sanitizer's: every block starts with shared memory full of NaN bytes
// and the outputs start as NaN (as torch.empty and a previous kernel may leave them), so a value read
// before it is written, or an output element never written, shows as a non-finite result (initcheck);
// bytes past the kernel's own layout must still hold the poison after each block (an overrun, memcheck);
// and the CTest variant built with -fsanitize=thread (--quick) reports any two emulated CUDA threads of
// one block that touch the same shared or global word without a __syncthreads / __syncwarp between
// them (racecheck within a block; blocks run one after another here).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

#include "cuda_emulation/cuda_emulation.h"

namespace oclear::cuda {
namespace {
// The kernels' dynamic shared memory (they declare `extern __shared__ unsigned char smem[]`).
alignas(128) unsigned char smem[256 * 1024];
}  // namespace
}  // namespace oclear::cuda

#define OCLEAR_CUDA_EMULATION 1
#include "../cuda/concept_attention_tc.cu"

namespace {

using oclear::cuda::AttentionArgs;
using oclear::cuda::AttentionDtype;
namespace tc = oclear::cuda;

struct Case {
  int b, h, lq, lk, dh;
  bool shared;
};

template <typename T>
T to_t(float x);
template <>
__nv_bfloat16 to_t<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__half to_t<__half>(float x) {
  return __float2half(x);
}

template <typename T>
std::vector<double> widen(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = nvcuda::wmma::element(v[i]);
  return out;
}

template <typename T>
std::vector<T> random_tensor(size_t n, std::mt19937& gen) {
  std::normal_distribution<float> dist;
  std::vector<T> v(n);
  for (auto& x : v) x = to_t<T>(dist(gen));
  return v;
}

struct Reference {
  std::vector<double> out, lse, dq, dk, dv;
};

// float64 forward and backward of softmax(scale q k^T, masked) v on the (rounded) inputs.
Reference reference(const Case& c, const std::vector<double>& q, const std::vector<double>& k,
                    const std::vector<double>& v, const std::vector<char>& mask, const std::vector<double>& dout,
                    double scale) {
  const int kb = c.shared ? 1 : c.b;
  Reference r;
  r.out.assign(q.size(), 0.0);
  r.lse.assign(size_t(c.b) * c.h * c.lq, -INFINITY);
  r.dq.assign(q.size(), 0.0);
  r.dk.assign(size_t(kb) * c.h * c.lk * c.dh, 0.0);
  r.dv.assign(r.dk.size(), 0.0);
  std::vector<double> p(c.lk), dp(c.lk);
  for (int b = 0; b < c.b; ++b)
    for (int h = 0; h < c.h; ++h) {
      const size_t qo = (size_t(b) * c.h + h) * c.lq * c.dh, ko = (size_t(c.shared ? 0 : b) * c.h + h) * c.lk * c.dh;
      for (int i = 0; i < c.lq; ++i) {
        double m = -INFINITY;
        for (int j = 0; j < c.lk; ++j) {
          double s = 0;
          for (int d = 0; d < c.dh; ++d) s += q[qo + size_t(i) * c.dh + d] * k[ko + size_t(j) * c.dh + d];
          p[j] = mask[size_t(b) * c.lk + j] ? -INFINITY : scale * s;
          m = std::max(m, p[j]);
        }
        if (m == -INFINITY) continue;  // a row without keys: zeros, no gradient
        double l = 0;
        for (int j = 0; j < c.lk; ++j) l += p[j] = p[j] == -INFINITY ? 0.0 : std::exp(p[j] - m);
        r.lse[(size_t(b) * c.h + h) * c.lq + i] = m + std::log(l);
        double delta = 0;
        for (int j = 0; j < c.lk; ++j) p[j] /= l;
        for (int d = 0; d < c.dh; ++d) {
          double o = 0;
          for (int j = 0; j < c.lk; ++j) o += p[j] * v[ko + size_t(j) * c.dh + d];
          r.out[qo + size_t(i) * c.dh + d] = o;
          delta += o * dout[qo + size_t(i) * c.dh + d];
        }
        for (int j = 0; j < c.lk; ++j) {
          double x = 0;
          for (int d = 0; d < c.dh; ++d) x += dout[qo + size_t(i) * c.dh + d] * v[ko + size_t(j) * c.dh + d];
          dp[j] = p[j] * (x - delta);  // dS
        }
        for (int j = 0; j < c.lk; ++j)
          for (int d = 0; d < c.dh; ++d) {
            r.dq[qo + size_t(i) * c.dh + d] += scale * dp[j] * k[ko + size_t(j) * c.dh + d];
            r.dk[ko + size_t(j) * c.dh + d] += scale * dp[j] * q[qo + size_t(i) * c.dh + d];
            r.dv[ko + size_t(j) * c.dh + d] += p[j] * dout[qo + size_t(i) * c.dh + d];
          }
      }
    }
  return r;
}

// max |got - want| / (max |want| + 1e-6): errors relative to the tensor's scale; infinite where an
// element is not finite (never written, or computed from poisoned shared memory).
template <typename G>
double relative_error(const std::vector<G>& got, const std::vector<double>& want) {
  double err = 0, scale = 1e-6;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = nvcuda::wmma::element(got[i]);
    if (!std::isfinite(g)) return INFINITY;
    err = std::max(err, std::abs(g - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  return err / scale;
}

constexpr unsigned char kPoison = 0xFF;  // as 16- or 32-bit floats these bytes are NaN

// cuda_emulation::launch with the shared memory poisoned before every block and, after it, checked
// unchanged past the `bytes` the kernel's layout claims.
bool launch_poisoned(const char* name, unsigned grid, size_t bytes, const std::function<void()>& kernel) {
  bool overrun = false;
  cuda_emulation::launch(
      grid, tc::kThreads, kernel, [](unsigned) { std::memset(tc::smem, kPoison, sizeof tc::smem); },
      [&](unsigned block) {
        const auto* first = std::find_if(tc::smem + bytes, std::end(tc::smem), [](unsigned char c) { return c != kPoison; });
        if (first != std::end(tc::smem) && !overrun) {
          std::printf("%s block %u wrote shared memory byte %zu, past its layout's %zu bytes\n", name, block,
                      size_t(first - tc::smem), bytes);
          overrun = true;
        }
      });
  return !overrun;
}

template <typename T, int kDh>
bool run_case(const Case& c, const char* dtype_name, std::mt19937& gen) {
  const int kb = c.shared ? 1 : c.b;
  const size_t nq = size_t(c.b) * c.h * c.lq * kDh, nk = size_t(kb) * c.h * c.lk * kDh, nrow = size_t(c.b) * c.h * c.lq;
  std::vector<T> q = random_tensor<T>(nq, gen), k = random_tensor<T>(nk, gen), v = random_tensor<T>(nk, gen);
  std::vector<T> dout = random_tensor<T>(nq, gen);
  std::vector<char> mask_bytes(size_t(c.b) * c.lk);
  std::bernoulli_distribution pad(0.3);
  for (size_t x = 0; x < mask_bytes.size(); ++x) mask_bytes[x] = x < size_t(c.lk) ? 1 : pad(gen);  // batch 0: all padding
  std::unique_ptr<bool[]> mask(new bool[mask_bytes.size()]);
  for (size_t x = 0; x < mask_bytes.size(); ++x) mask[x] = mask_bytes[x] != 0;
  const float scale = 1.f / std::sqrt(float(kDh));

  AttentionArgs a;
  a.batch = c.b;
  a.heads = c.h;
  a.lq = c.lq;
  a.lk = c.lk;
  a.dh = kDh;
  a.kv_broadcast = c.shared;
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  const int64_t qs[3] = {int64_t(c.h) * c.lq * kDh, int64_t(c.lq) * kDh, kDh};
  const int64_t ks[3] = {int64_t(c.h) * c.lk * kDh, int64_t(c.lk) * kDh, kDh};
  for (int i = 0; i < 3; ++i) {
    a.q_strides[i] = qs[i];
    a.k_strides[i] = ks[i];
    a.v_strides[i] = ks[i];
  }
  a.mask = mask.get();
  a.scale = scale;
  a.dtype = std::is_same_v<T, __nv_bfloat16> ? AttentionDtype::kBFloat16 : AttentionDtype::kFloat16;

  const tc::TcParams p = tc::make_params(a, dout.data());
  // Outputs as the glue allocates them: uninitialised (NaN here), except the shared memory's float32
  // accumulators, which it zeroes.
  const T nan_t = to_t<T>(NAN);
  std::vector<T> out(nq, nan_t), dq(nq, nan_t), dk(size_t(kb) * c.h * c.lk * kDh, nan_t), dv(dk.size(), nan_t);
  std::vector<float> lse(nrow, NAN), delta(nrow, NAN), acc_k, acc_v;
  if (c.shared) {
    acc_k.assign(nk, 0.f);
    acc_v.assign(nk, 0.f);
  }
  const size_t forward_bytes = tc::query_layout(kDh, p.lkp, false).total;
  const size_t dq_bytes = tc::query_layout(kDh, p.lkp, true).total, dkdv_bytes = tc::key_layout(kDh).total;
  if (std::max(dq_bytes, dkdv_bytes) > sizeof(tc::smem)) {
    std::printf("%s %d %d: shared memory %zu exceeds the emulation's buffer\n", dtype_name, c.lk, kDh,
                std::max(dq_bytes, dkdv_bytes));
    return false;
  }
  const unsigned query_blocks = unsigned((c.lq + tc::kRows - 1) / tc::kRows * c.h * c.b);
  bool in_bounds = launch_poisoned("forward", query_blocks, forward_bytes, [&] {
    tc::forward_tc_kernel<T, kDh>(p, q.data(), k.data(), v.data(), out.data(), lse.data());
  });
  in_bounds &= launch_poisoned("dq", query_blocks, dq_bytes, [&] {
    tc::dq_tc_kernel<T, kDh>(p, q.data(), k.data(), v.data(), dout.data(), out.data(), lse.data(), delta.data(),
                             dq.data());
  });
  const int64_t key_tiles = (c.lk + tc::kRows - 1) / tc::kRows;
  const int64_t chunks = c.shared ? std::min<int64_t>(c.b, 2) : c.b;  // two chunks: the atomic sum over blocks
  in_bounds &= launch_poisoned("dk/dv", unsigned(key_tiles * c.h * chunks), dkdv_bytes, [&] {
    tc::dkdv_tc_kernel<T, kDh>(p, chunks, q.data(), k.data(), v.data(), dout.data(), lse.data(), delta.data(), dk.data(),
                               dv.data(), acc_k.data(), acc_v.data());
  });
  if (c.shared) {
    for (size_t x = 0; x < nk; ++x) {
      dk[x] = to_t<T>(acc_k[x]);
      dv[x] = to_t<T>(acc_v[x]);
    }
  }

  const Reference r = reference(c, widen(q), widen(k), widen(v), mask_bytes, widen(dout), scale);
  double lse_err = 0;
  for (size_t x = 0; x < nrow; ++x) {
    if (std::isnan(lse[x]) || std::isinf(r.lse[x]) != std::isinf(lse[x])) lse_err = INFINITY;
    else if (!std::isinf(r.lse[x])) lse_err = std::max(lse_err, std::abs(lse[x] - r.lse[x]));
  }
  bool empty_ok = true;  // batch element 0 has no keys: zero output and zero dq, exactly
  for (size_t x = 0; x < size_t(c.h) * c.lq * kDh; ++x) {
    empty_ok &= nvcuda::wmma::element(out[x]) == 0.f && nvcuda::wmma::element(dq[x]) == 0.f;
  }
  // 16-bit P and dS (as FlashAttention) and delta from the 16-bit output: errors of a few units of the
  // format's precision relative to the tensor's largest entry (seen: up to 5e-3 in bf16, 5e-3 in fp16 where
  // dS = P (dP - delta) cancels); an indexing or masking bug gives errors of order 1.
  const double tol = std::is_same_v<T, __nv_bfloat16> ? 3e-2 : 1e-2;
  const double errs[4] = {relative_error(out, r.out), relative_error(dq, r.dq), relative_error(dk, r.dk),
                          relative_error(dv, r.dv)};
  const bool ok = in_bounds && empty_ok && lse_err < 1e-3 &&
                  std::all_of(std::begin(errs), std::end(errs), [&](double e) { return e < tol; });
  std::printf("%s B=%d H=%d Lq=%d Lk=%d Dh=%d %s: out %.2g dq %.2g dk %.2g dv %.2g lse %.2g empty rows %s -> %s\n",
              dtype_name, c.b, c.h, c.lq, c.lk, kDh, c.shared ? "shared" : "per-batch", errs[0], errs[1], errs[2],
              errs[3], lse_err, empty_ok ? "zero" : "NOT ZERO", ok ? "ok" : "FAILED");
  return ok;
}

}  // namespace

// --quick: the first two cases only, for the ThreadSanitizer build (each emulated thread runs ~10x
// slower there): per-batch and shared keys, ragged query and key tiles, warps without queries or keys,
// and (the second) a dk/dv block that loops over two batch elements of two query stages each, so that
// every barrier of every kernel orders something.
int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  if (argc > 1 && !quick) {
    std::fprintf(stderr, "usage: %s [--quick]\n", argv[0]);
    return 2;
  }
  std::mt19937 gen(7);
  bool ok = true;
  const std::vector<Case> all = {{3, 2, 33, 70, 64, false},  {3, 1, 70, 40, 32, true},  {3, 2, 1, 32, 64, false},
                                 {3, 2, 70, 144, 64, true},  {2, 2, 17, 100, 32, true}, {2, 1, 5, 3, 16, false},
                                 {3, 1, 64, 65, 32, false}};
  const std::vector<Case> cases(all.begin(), quick ? all.begin() + 2 : all.end());
  for (const Case& c : cases) {
    switch (c.dh) {
      case 16:
        ok &= run_case<__nv_bfloat16, 16>(c, "bf16", gen);
        ok &= run_case<__half, 16>(c, "fp16", gen);
        break;
      case 32:
        ok &= run_case<__nv_bfloat16, 32>(c, "bf16", gen);
        ok &= run_case<__half, 32>(c, "fp16", gen);
        break;
      default:
        ok &= run_case<__nv_bfloat16, 64>(c, "bf16", gen);
        ok &= run_case<__half, 64>(c, "fp16", gen);
    }
  }
  std::printf(ok ? "all cases passed\n" : "SOME CASES FAILED\n");
  return ok ? 0 : 1;
}
