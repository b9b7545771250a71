// The measured choice between the own matrix kernel and BLAS (see
// cpu_gemm_policy.h).
//
// Cost of the measuring (`python benchmarks/cpu_gemm_tuning_cost.py
// --threads 1`, AMD EPYC Zen 5 under a load average of ~13 on 2 cores, so
// every time here is inflated several-fold): cifar_cnn 9 classes, 0.62 s;
// mnist_cnn 3 classes, 0.30 s; lstm_mnist 3 classes, 0.11 s; the other
// models of bench_models.py 0-3 classes, < 1 ms. That is 0.011-0.064% of one
// epoch of training at the same load (median step time x steps per epoch).
#include "common/cpu_gemm_policy.h"

#include "common/cpu_gemm.h"
#include "common/cpu_gemm_decision_file.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

namespace handgrad {
namespace cpu_gemm {
namespace {

Policy policy_from_env() {
  const char* v = std::getenv("HANDGRAD_CPU_GEMM");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return Policy::automatic;
  if (std::strcmp(v, "own") == 0) return Policy::own;
  if (std::strcmp(v, "blas") == 0) return Policy::blas;
  std::fprintf(stderr, "handgrad: HANDGRAD_CPU_GEMM=%s is not own, blas or auto; using auto\n", v);
  return Policy::automatic;
}

std::atomic<int>& policy_slot() {
  static std::atomic<int> slot{static_cast<int>(policy_from_env())};
  return slot;
}

bool verbose() {
  static const bool on = [] {
    const char* v = std::getenv("HANDGRAD_CPU_GEMM_VERBOSE");
    return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
  }();
  return on;
}

// Bumped by clear_decisions: thread-local caches older than it are dropped.
std::atomic<uint64_t> generation{1};

struct Registry {
  std::mutex mutex;
  std::unordered_map<uint64_t, Kernel> chosen;
  std::vector<Decision> decisions;
  double tuning_seconds = 0;
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: used until exit
  return *r;
}

// 0 for 0, else 1 + floor(log2(x)), at most 63.
uint64_t bucket(int64_t x) {
  if (x <= 0) return 0;
  return std::min<uint64_t>(63, 64 - __builtin_clzll(static_cast<uint64_t>(x)));
}

// The thread count is not part of the class: a class keeps the kernel it
// was measured with at its first thread count, so within a process results
// never depend on torch.set_num_threads (each kernel on its own is
// thread-count independent; a per-thread-count choice would not be).
uint64_t class_key(const Problem& p) {
  uint64_t key = bucket(p.m);
  key = key << 6 | bucket(p.n);
  key = key << 6 | bucket(p.k);
  key = key << 1 | p.a_transposed;
  key = key << 1 | p.b_transposed;
  key = key << 2 | static_cast<uint64_t>(p.site);
  key = key << 1 | p.calling_thread;
  return key;
}

int threads_of(const Problem& p) { return p.calling_thread ? 1 : at::get_num_threads(); }

// Deterministic operand values (the global RNG is left alone), in [-1, 1).
at::Tensor filled(int64_t rows, int64_t cols) {
  at::Tensor t = at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
  float* p = t.mutable_data_ptr<float>();
  for (int64_t i = 0; i < rows * cols; ++i) {
    p[i] = static_cast<float>((static_cast<uint32_t>(i) * 2654435761u >> 8) & 1023) / 512.0f - 1.0f;
  }
  return t;
}

// MKL on one thread for the calling-thread problems (its own count otherwise).
struct OneBlasThread {
  int previous = 0;
  bool set = false;
  explicit OneBlasThread(bool on) : set(on && MKL_Set_Num_Threads_Local != nullptr) {
    if (set) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~OneBlasThread() {
    if (set) MKL_Set_Num_Threads_Local(previous);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;
};

// C (m x n, row-major, ldc) = A B through the Fortran sgemm_ (column-major):
// C^T = B^T A^T.
void sgemm_row_major(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, bool at,
                     const float* b, int64_t ldb, bool bt, float* c, int64_t ldc) {
  const char ta = bt ? 'T' : 'N', tb = at ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float one = 1.0f, zero = 0.0f;
  sgemm_(&ta, &tb, &im, &in, &ik, &one, b, &la, a, &lb, &zero, c, &lc);
}

template <typename F>
double seconds_of(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

Decision measure(const Problem& p, int threads) {
  const c10::InferenceMode no_autograd;
  const int64_t m = std::max<int64_t>(p.m, 1), n = std::max<int64_t>(p.n, 1),
                k = std::max<int64_t>(p.k, 1);
  const at::Tensor a = p.a_transposed ? filled(k, m).t() : filled(m, k);
  const at::Tensor b = p.b_transposed ? filled(n, k).t() : filled(k, n);
  at::Tensor c = at::empty({m, n}, at::TensorOptions().dtype(at::kFloat));
  const float* ap = a.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* cp = c.mutable_data_ptr<float>();
  PackedB packed;
  if (p.site == Site::packed_b) pack_b(bp, b.stride(0), b.stride(1), k, n, packed);
  const bool have_sgemm = sgemm_ != nullptr && m <= INT_MAX && n <= INT_MAX && k <= INT_MAX;

  auto own = [&] {
    switch (p.site) {
      case Site::tensor:
        matmul(m, n, k, ap, a.stride(0), a.stride(1), bp, b.stride(0), b.stride(1), cp, n, false);
        break;
      case Site::packed_b:
        matmul(m, ap, a.stride(0), a.stride(1), packed, cp, n, false);
        break;
      case Site::tile:
        matmul_tile(m, n, k, 1.0f, ap, a.stride(0), a.stride(1), bp, b.stride(0), b.stride(1), cp,
                    n, false);
        break;
    }
  };
  auto blas = [&] {
    if (p.site == Site::tile && have_sgemm) {
      sgemm_row_major(m, n, k, ap, p.a_transposed ? m : k, p.a_transposed, bp,
                      p.b_transposed ? k : n, p.b_transposed, cp, n);
    } else {
      at::mm_out(c, a, b);
    }
  };
  // The calling-thread problems run with the pool and BLAS held to one thread.
  const c10::ParallelGuard serial(p.calling_thread || at::in_parallel_region());
  const OneBlasThread one_thread(p.calling_thread);

  Decision d;
  d.problem = p;
  d.threads = threads;
  // Warm-up (packing scratch, caches), which also sizes the samples: each
  // sample runs a kernel enough times to last ~20 us (a timer read is ~20
  // ns, tile products ~1 us), 5 interleaved samples per kernel, 3 when one
  // product takes over 2 ms, 1 over 20 ms; the minimum sample counts (noise
  // from other processes only adds time).
  const double warm = std::max(seconds_of(own), seconds_of(blas));
  const int calls = static_cast<int>(std::clamp(20e-6 / std::max(warm, 1e-9), 1.0, 200.0));
  const int samples = warm > 0.02 ? 1 : warm > 0.002 ? 3 : 5;
  auto repeated = [calls](auto& f) {
    return [&f, calls] {
      for (int i = 0; i < calls; ++i) f();
    };
  };
  auto own_sample = repeated(own);
  auto blas_sample = repeated(blas);
  d.own_seconds = d.blas_seconds = 1e30;
  for (int r = 0; r < samples; ++r) {
    d.own_seconds = std::min(d.own_seconds, seconds_of(own_sample) / calls);
    d.blas_seconds = std::min(d.blas_seconds, seconds_of(blas_sample) / calls);
  }
  d.kernel = d.own_seconds <= d.blas_seconds ? Kernel::own : Kernel::blas;
  return d;
}

Kernel measured(const Problem& p) {
  const int threads = threads_of(p);
  const uint64_t key = class_key(p);
  struct Cache {
    uint64_t generation = 0;
    std::unordered_map<uint64_t, Kernel> chosen;
  };
  thread_local Cache cache;
  const uint64_t now = generation.load(std::memory_order_acquire);
  if (cache.generation != now) {
    cache.chosen.clear();
    cache.generation = now;
  }
  auto hit = cache.chosen.find(key);
  if (hit != cache.chosen.end()) return hit->second;

  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto known = r.chosen.find(key);
  Kernel kernel;
  if (known != r.chosen.end()) {
    kernel = known->second;
  } else {
    const Decision d = decision_file::find_or_measure(key, threads, [&] {
      const auto t0 = std::chrono::steady_clock::now();
      Decision measured_here = measure(p, threads);
      r.tuning_seconds +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      return measured_here;
    });
    r.chosen.emplace(key, d.kernel);
    r.decisions.push_back(d);
    kernel = d.kernel;
    if (verbose()) {
      std::fprintf(stderr,
                   "handgrad cpu gemm: m=%lld n=%lld k=%lld%s%s %s threads=%d: own %.1f us, "
                   "blas %.1f us -> %s (%s; tuning so far %.1f ms)\n",
                   static_cast<long long>(p.m), static_cast<long long>(p.n),
                   static_cast<long long>(p.k), p.a_transposed ? " A^T" : "",
                   p.b_transposed ? " B^T" : "", site_name(p.site), threads,
                   d.own_seconds * 1e6, d.blas_seconds * 1e6,
                   d.kernel == Kernel::own ? "own" : "blas",
                   d.stored ? "from the decision file" : "measured", r.tuning_seconds * 1e3);
    }
  }
  cache.chosen.emplace(key, kernel);
  return kernel;
}

}  // namespace

const char* site_name(Site s) {
  switch (s) {
    case Site::tensor: return "tensor";
    case Site::packed_b: return "packed_b";
    case Site::tile: return "tile";
  }
  return "?";
}

Policy policy() { return static_cast<Policy>(policy_slot().load(std::memory_order_relaxed)); }

void set_policy(Policy p) { policy_slot().store(static_cast<int>(p), std::memory_order_relaxed); }

const char* policy_name(Policy p) {
  switch (p) {
    case Policy::own: return "own";
    case Policy::blas: return "blas";
    case Policy::automatic: return "auto";
  }
  return "?";
}

Kernel choose(const Problem& p) {
  if (!available()) return Kernel::blas;
  switch (policy()) {
    case Policy::own: return Kernel::own;
    case Policy::blas: return Kernel::blas;
    case Policy::automatic: break;
  }
  // Nothing to time: an empty product costs nothing either way.
  if (p.m == 0 || p.n == 0 || p.k == 0) return Kernel::own;
  return measured(p);
}

Problem problem_of(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, Site site,
                   bool calling_thread) {
  (void)c;
  Problem p;
  p.m = a.size(0);
  p.k = a.size(1);
  p.n = b.size(1);
  p.a_transposed = a.stride(0) == 1 && a.stride(1) != 1 && a.size(0) > 1;
  p.b_transposed = b.stride(0) == 1 && b.stride(1) != 1 && b.size(0) > 1;
  p.site = site;
  p.calling_thread = calling_thread;
  return p;
}

void gemm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const bool own_applies = c.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
                           b.scalar_type() == at::kFloat && c.dim() == 2 && a.dim() == 2 &&
                           b.dim() == 2 && (c.stride(1) == 1 || c.size(1) <= 1);
  if (own_applies &&
      choose(problem_of(c, a, b, Site::tensor, at::in_parallel_region())) == Kernel::own &&
      mm(c, a, b, accumulate)) {
    return;
  }
  at::Tensor out = c;  // addmm_ / mm_out take non-const references
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

std::vector<Decision> decisions() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  return r.decisions;
}

double tuning_seconds() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  return r.tuning_seconds;
}

void clear_decisions() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.chosen.clear();
  r.decisions.clear();
  r.tuning_seconds = 0;
  generation.fetch_add(1, std::memory_order_acq_rel);
}

std::string blas_name() {
  if (at::hasMKL()) return "mkl";
  return sgemm_ != nullptr ? "blas (sgemm_)" : "none";
}

}  // namespace cpu_gemm
}  // namespace handgrad
