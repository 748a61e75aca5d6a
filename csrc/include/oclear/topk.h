// Streaming top-k over (score, class id) candidates, shared ordering for CPU and CUDA code.
//
// Order: higher score first; equal scores by smaller class id, so the selection is deterministic and
// equal to a stable descending sort of the materialised scores. A NaN score ranks below everything
// (it can never be "hardest"). The host buffer keeps at most k entries; each push_batch costs
// O(k + batch) (nth_element), so a pass over C classes in chunks of T costs O(C/T (k + T)) time and
// O(k + T) memory, never O(C) scores at once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "margin.h"  // OCLEAR_HD

namespace oclear {

template <typename T>
struct ScoredClass {
  T score;
  int64_t id;
};

// True when a ranks before b.
template <typename T>
OCLEAR_HD bool ranks_before(const ScoredClass<T>& a, const ScoredClass<T>& b) {
  const bool a_nan = a.score != a.score, b_nan = b.score != b.score;
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a.score != b.score) return a.score > b.score;
  return a.id < b.id;
}

template <typename T>
class TopKBuffer {
 public:
  explicit TopKBuffer(int64_t k) : k_(k) { items_.reserve(static_cast<size_t>(2 * k + 16)); }

  // Adds candidates; keeps the best k of everything pushed so far.
  void push_batch(const ScoredClass<T>* candidates, int64_t count) {
    items_.insert(items_.end(), candidates, candidates + count);
    if (static_cast<int64_t>(items_.size()) > 2 * k_ + 1024) shrink();
  }

  // The best k (or fewer, if fewer were pushed), best first.
  std::vector<ScoredClass<T>> finish() {
    shrink();
    std::sort(items_.begin(), items_.end(), ranks_before<T>);
    return items_;
  }

 private:
  void shrink() {
    if (static_cast<int64_t>(items_.size()) <= k_) return;
    std::nth_element(items_.begin(), items_.begin() + k_, items_.end(), ranks_before<T>);
    items_.resize(static_cast<size_t>(k_));
  }

  int64_t k_;
  std::vector<ScoredClass<T>> items_;
};

}  // namespace oclear
