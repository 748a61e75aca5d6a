// Unit tests of csrc/include/oclear/topk.h: ordering rule and streaming top-k buffer.
#include <oclear/topk.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

int passed = 0, failed = 0;

void check(bool ok, const char* what, int line) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAILED line %d: %s\n", line, what);
  }
}
#define CHECK(cond) check((cond), #cond, __LINE__)

using Item = oclear::ScoredClass<double>;

void test_ordering() {
  CHECK(oclear::ranks_before(Item{0.9, 5}, Item{0.1, 1}));   // higher score first
  CHECK(oclear::ranks_before(Item{0.5, 2}, Item{0.5, 7}));   // tie: smaller id first
  CHECK(!oclear::ranks_before(Item{0.5, 7}, Item{0.5, 2}));
  CHECK(!oclear::ranks_before(Item{0.5, 3}, Item{0.5, 3}));  // irreflexive
  CHECK(oclear::ranks_before(Item{-INFINITY, 9}, Item{NAN, 0}));  // NaN ranks below everything
  CHECK(!oclear::ranks_before(Item{NAN, 0}, Item{-1e300, 1}));
  CHECK(oclear::ranks_before(Item{NAN, 1}, Item{NAN, 4}));   // NaNs among themselves by id
}

// Streaming in chunks of any size gives exactly the first k of a full sort.
void test_streaming_equals_full_sort() {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> few_values(0, 20);  // many ties
  for (int trial = 0; trial < 50; ++trial) {
    const int c = 1 + trial * 37, k = trial % 3 == 0 ? c : (c * (trial % 7)) / 7, chunk = 1 + trial % 300;
    std::vector<Item> all;
    for (int i = 0; i < c; ++i) all.push_back({few_values(rng) / 4.0, i});
    if (trial % 5 == 0) all[c / 2].score = NAN;
    oclear::TopKBuffer<double> buffer(k);
    for (int start = 0; start < c; start += chunk) buffer.push_batch(all.data() + start, std::min(chunk, c - start));
    const std::vector<Item> got = buffer.finish();
    std::vector<Item> want = all;
    std::sort(want.begin(), want.end(), oclear::ranks_before<double>);
    want.resize(k);
    bool same = got.size() == want.size();
    for (size_t i = 0; same && i < got.size(); ++i) same = got[i].id == want[i].id;
    CHECK(same);
  }
}

}  // namespace

int main() {
  test_ordering();
  test_streaming_equals_full_sort();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
