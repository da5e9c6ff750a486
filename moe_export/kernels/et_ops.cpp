// ExecuTorch kernels of the native .pte ops: moe_export::mixed_width_moe.out, packed_linear.out and
// packed_embedding.out (schemas: moe_export/export/ops.py). Only the glue lives here: check the ExecuTorch
// tensors, describe each width group as a moe_export_core::PackedWeight (pointers into the program's constant
// data, nothing copied or unpacked) and call the kernel core (core/mixed_width.h), the same arithmetic the
// torch extension of the compiled path runs.
//
// Built by moe_export.kernels.et_native against the executorch wheel (headers + libexecutorch.so) and loaded
// with RTLD_GLOBAL before a program, or by kernels/CMakeLists.txt against an ExecuTorch install. The
// EXECUTORCH_LIBRARY statics register the kernels into the runtime's operator table when the library loads.
//
// A check that fails logs one line naming the op and the argument and fails the method with InvalidArgument
// (Python: RuntimeError from Method.execute).

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/exec_aten.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>
#ifdef ET_USE_THREADPOOL
#include <executorch/extension/threadpool/threadpool_guard.h>
#endif

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>
#include <type_traits>
#include <vector>

#include "core/mixed_width.h"

namespace moe_export_et {

using executorch::aten::ArrayRef;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;
namespace core = moe_export_core;

using OptTensor = std::optional<Tensor>;

// The core's parallel loop: blocks of output rows (16 rows each) over as many threads as the runtime's threadpool
// has (executorch::extension::get_thread_count(), what a runner sets), run by this library's own workers.
//
// Why not the runtime's pool (executorch::extension::parallel_for): its pthreadpool workers sleep after about 1000
// pause loops (microseconds), and its caller waits until every worker has woken and checked in, even one whose share
// the caller ran itself. A decode step is a few dozen ops of 10-150 us with serial work between them, so the pool's
// worker was put to sleep and woken 6-18 times a step (on an idle VM each wake starts a halted vCPU), and the Mixtral
// slice's native .pte decoded slower at 2 threads than at 1 (the bench's protocol, 2-core VM: 283 vs 304 tok/s).
// Here the caller and the workers claim chunks of blocks from one counter, the caller returns once every chunk is
// done (a late worker finds nothing left and costs nothing), and a worker spins for a while after each job before it
// sleeps, spanning the serial gaps of a decode step as OpenMP's workers do for the compiled path: 0.1 sleeps a step
// and 431 tok/s at 2 threads, together with the program's XNNPACK delegates loaded without the runtime's pool
// (moe_export_et_serial_delegates: their tiny decode ops woke the runtime's worker as often, and it fought this
// pool's worker for the cores). MOE_EXPORT_ET_SPIN_US sets the spin (default 500 us; 0 sleeps at once, e.g. where
// idle cores cost power). Every row is computed by the same code whichever thread runs its block, so outputs do not
// depend on the split.
class RowPool {
 public:
  using Range = void (*)(void* job, int64_t begin, int64_t end);

  // Runs range(job, b, e) over chunks covering [0, blocks) on `threads` threads (the caller is one of them);
  // false when it did not (one thread, one block, or the pool is busy with another caller's op): run serially then.
  static bool run(int64_t threads, int64_t blocks, void* job, Range range) {
    if (threads <= 1 || blocks <= 1) return false;
    return instance().run_job(int(std::min<int64_t>(threads, kMaxThreads)), blocks, job, range);
  }

  // Threads the latest split job was spread over (0: none yet), for tests and benchmarks to check the split ran.
  static int last_threads() { return last_threads_.load(std::memory_order_relaxed); }

 private:
  static constexpr int kMaxThreads = 64;
  static constexpr int64_t kChunksPerThread = 4;  // finer than one share a thread: a late worker leaves less to wait for

  // One pool per process, created on first use and never destroyed (its workers outlive static destructors). A
  // forked child has none of the parent's threads: it starts a new pool and leaves the old one alone.
  static RowPool& instance() {
    static std::atomic<RowPool*> pool{nullptr};
    static std::once_flag at_fork;
    std::call_once(at_fork, [] { pthread_atfork(nullptr, nullptr, [] { pool.store(nullptr); }); });
    RowPool* p = pool.load(std::memory_order_acquire);
    if (p == nullptr) {
      RowPool* fresh = new RowPool();
      if (pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
      delete fresh;  // another thread installed one first
    }
    return *p;
  }

  RowPool() {
    const char* env = std::getenv("MOE_EXPORT_ET_SPIN_US");
    spin_us_ = env != nullptr ? std::max(0L, std::strtol(env, nullptr, 10)) : 500;
  }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
    asm volatile("yield");
#endif
  }

  bool run_job(int threads, int64_t blocks, void* job, Range range) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    if (int(workers_.size()) + 1 != threads) resize(threads);
    const int64_t chunks = std::min<int64_t>(blocks, kChunksPerThread * threads);
    job_.store(job, std::memory_order_relaxed);
    range_.store(range, std::memory_order_relaxed);
    blocks_.store(blocks, std::memory_order_relaxed);
    chunks_.store(chunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint32_t gen = ++gen_;
    claim_.store(uint64_t(gen) << 32, std::memory_order_seq_cst);  // publishes the job's fields above
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_);
      wake_.notify_all();
    }
    last_threads_.store(threads, std::memory_order_relaxed);
    work(gen);
    for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins < 4096) pause(); else std::this_thread::yield();  // a claimed chunk's worker lost its core
    }
    return true;
  }

  // Claims and runs chunks of job `gen` until none is left. The job's fields are read after a load that saw `gen`
  // and before the claim: if the caller has moved on to a newer job meanwhile, the claim (which compares the
  // generation too) fails, so a chunk only ever runs with its own job's fields.
  void work(uint32_t gen) {
    for (;;) {
      uint64_t c = claim_.load(std::memory_order_acquire);
      if (uint32_t(c >> 32) != gen) return;
      const int64_t i = int64_t(c & 0xffffffffu), n = chunks_.load(std::memory_order_relaxed);
      const int64_t blocks = blocks_.load(std::memory_order_relaxed);
      void* job = job_.load(std::memory_order_relaxed);
      Range range = range_.load(std::memory_order_relaxed);
      if (i >= n) return;
      if (!claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_relaxed)) continue;
      range(job, i * blocks / n, (i + 1) * blocks / n);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void worker(uint32_t seen) {
#ifdef __linux__
    pthread_setname_np(pthread_self(), "moe_export_rows");  // what profilers and /proc show for these threads
#endif
    for (;;) {
      uint32_t gen = seen;
      const auto start = std::chrono::steady_clock::now();
      for (int spins = 1;; ++spins) {
        if (stop_.load(std::memory_order_relaxed)) return;
        gen = uint32_t(claim_.load(std::memory_order_acquire) >> 32);
        if (gen != seen) break;
        pause();
        if (spins % 256 == 0 && std::chrono::steady_clock::now() - start >= std::chrono::microseconds(spin_us_)) {
          std::unique_lock<std::mutex> lock(sleep_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          while ((gen = uint32_t(claim_.load(std::memory_order_seq_cst) >> 32)) == seen && !stop_.load()) {
            wake_.wait(lock);
          }
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
          if (stop_.load()) return;
          break;
        }
      }
      seen = gen;
      work(gen);
    }
  }

  // New workers for another thread count (the runner resized the runtime's pool); no job is in flight.
  void resize(int threads) {
    {
      std::lock_guard<std::mutex> lock(sleep_);
      stop_.store(true);
      wake_.notify_all();
    }
    for (auto& t : workers_) t.join();
    workers_.clear();
    stop_.store(false);
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, seen = gen_] { worker(seen); });
  }

  static inline std::atomic<int> last_threads_{0};
  std::mutex busy_;  // one op at a time; another caller's op runs serially
  std::vector<std::thread> workers_;
  uint32_t gen_ = 0;  // the latest job's generation (under busy_)
  long spin_us_ = 500;
  std::atomic<uint64_t> claim_{0};  // generation << 32 | next chunk
  std::atomic<int64_t> done_{0};    // chunks of the current job finished
  std::atomic<void*> job_{nullptr};
  std::atomic<Range> range_{nullptr};
  std::atomic<int64_t> blocks_{0}, chunks_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_;
  std::condition_variable wake_;
};

struct EtParallel {
  template <class Fn>
  void operator()(int64_t begin, int64_t end, Fn&& fn) const {
    using F = std::remove_reference_t<Fn>;
    struct Job {
      F* fn;
      int64_t begin;
    } job{&fn, begin};
    const auto range = [](void* p, int64_t b, int64_t e) {
      Job* j = static_cast<Job*>(p);
      (*j->fn)(j->begin + b, j->begin + e);
    };
    if (!RowPool::run(executorch::extension::get_thread_count(), end - begin, &job, range)) fn(begin, end);
  }
};

#define MOE_CHECK(cond, op, fmt, ...)                                                                 \
  do {                                                                                                 \
    if (!(cond)) {                                                                                     \
      ET_LOG(Error, "moe_export::%s: " fmt, op, ##__VA_ARGS__);                                        \
      ctx.fail(Error::InvalidArgument);                                                                \
      return false;                                                                                    \
    }                                                                                                  \
  } while (false)

// One packed weight: codes uint8 [E, N, K*b/8] (rank 3) or [N, K*b/8] (rank 2), scale/zero float16 [.., N, G].
bool packed_weight(KernelRuntimeContext& ctx, const char* op, const char* what, const Tensor& codes,
                   const Tensor& scale, const OptTensor& zero, int64_t bits, int64_t cols, size_t rank,
                   core::PackedWeight* w) {
  MOE_CHECK(bits >= 1 && bits <= 8, op, "%s: bits must be in 1..8, got %lld", what, (long long)bits);
  MOE_CHECK(codes.scalar_type() == ScalarType::Byte && size_t(codes.dim()) == rank, op,
            "%s: codes must be uint8 of rank %zu", what, rank);
  MOE_CHECK(cols > 0 && cols % 8 == 0 && codes.size(rank - 1) * 8 == cols * bits, op,
            "%s: %lld bytes a row do not hold K=%lld codes of %lld bits", what, (long long)codes.size(rank - 1),
            (long long)cols, (long long)bits);
  MOE_CHECK(scale.scalar_type() == ScalarType::Half && size_t(scale.dim()) == rank, op,
            "%s: scale must be float16 of rank %zu", what, rank);
  for (size_t d = 0; d + 1 < rank; ++d) {
    MOE_CHECK(scale.size(d) == codes.size(d), op, "%s: scale dim %zu is %lld, codes have %lld", what, d,
              (long long)scale.size(d), (long long)codes.size(d));
  }
  const int64_t groups = scale.size(rank - 1);
  MOE_CHECK(groups > 0 && cols % groups == 0 && (cols / groups) % 8 == 0, op,
            "%s: K=%lld does not split into %lld groups of a multiple of 8", what, (long long)cols,
            (long long)groups);
  MOE_CHECK(executorch::runtime::tensor_is_contiguous(codes) && executorch::runtime::tensor_is_contiguous(scale),
            op, "%s: codes and scale must be contiguous", what);
  if (zero.has_value()) {
    const Tensor& z = zero.value();
    MOE_CHECK(z.scalar_type() == ScalarType::Half && z.dim() == scale.dim() && z.numel() == scale.numel() &&
                  executorch::runtime::tensor_is_contiguous(z),
              op, "%s: zero must be contiguous float16 shaped like scale", what);
  }
  w->codes = codes.const_data_ptr<uint8_t>();
  w->scale = reinterpret_cast<const uint16_t*>(scale.const_data_ptr());
  w->zero = zero.has_value() ? reinterpret_cast<const uint16_t*>(zero.value().const_data_ptr()) : nullptr;
  w->bits = int32_t(bits);
  w->experts = rank == 3 ? codes.size(0) : 1;
  w->rows = codes.size(rank - 2);
  w->cols = cols;
  w->group = cols / groups;
  return true;
}

bool float_tensor(KernelRuntimeContext& ctx, const char* op, const char* what, const Tensor& t) {
  MOE_CHECK(t.scalar_type() == ScalarType::Float && executorch::runtime::tensor_is_contiguous(t), op,
            "%s must be a contiguous float32 tensor", what);
  return true;
}

// Also where a forced vector path (MOE_EXPORT_CPU_PATH) that this CPU lacks is refused, before any kernel runs.
bool accuracy_of(KernelRuntimeContext& ctx, const char* op, int64_t accuracy, core::Accuracy* acc) {
  MOE_CHECK(accuracy == 0 || accuracy == 1, op, "accuracy must be 0 (exact) or 1 (int8), got %lld",
            (long long)accuracy);
  MOE_CHECK(core::path_error() == nullptr, op, "%s", core::path_error());
  *acc = accuracy == 0 ? core::Accuracy::Exact : core::Accuracy::Int8;
  return true;
}

// out gets `sizes` (its memory plan holds the largest shape; a dynamic dim shrinks it).
bool resize_out(KernelRuntimeContext& ctx, const char* op, Tensor& out, ArrayRef<executorch::aten::SizesType> sizes) {
  MOE_CHECK(out.scalar_type() == ScalarType::Float, op, "out must be float32");
  MOE_CHECK(executorch::runtime::resize_tensor(out, sizes) == Error::Ok, op,
            "out cannot take the result's shape (rank %zu)", sizes.size());
  return true;
}

bool check_moe(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& topk_ids, const Tensor& topk_weights,
               ArrayRef<Tensor> up_packed, ArrayRef<Tensor> up_scale, ArrayRef<OptTensor> up_zero,
               ArrayRef<Tensor> down_packed, ArrayRef<Tensor> down_scale, ArrayRef<OptTensor> down_zero,
               ArrayRef<int64_t> bits, ArrayRef<int64_t> expert_bits, ArrayRef<int64_t> slots,
               std::vector<core::PackedWeight>& up, std::vector<core::PackedWeight>& down,
               std::vector<int32_t>& group_of, std::vector<int32_t>& slot_of) {
  const char* op = "mixed_width_moe";
  if (!float_tensor(ctx, op, "x", x) || !float_tensor(ctx, op, "topk_weights", topk_weights)) return false;
  MOE_CHECK(x.dim() == 2, op, "x must be [T, H], got rank %zd", ssize_t(x.dim()));
  const int64_t T = x.size(0), H = x.size(1);
  MOE_CHECK(topk_ids.scalar_type() == ScalarType::Long && topk_ids.dim() == 2 && topk_ids.size(0) == T &&
                executorch::runtime::tensor_is_contiguous(topk_ids),
            op, "topk_ids must be contiguous int64 [T=%lld, k]", (long long)T);
  MOE_CHECK(topk_weights.dim() == 2 && topk_weights.size(0) == T && topk_weights.size(1) == topk_ids.size(1), op,
            "topk_weights must be shaped like topk_ids [%lld, %lld]", (long long)T, (long long)topk_ids.size(1));
  const size_t G = bits.size();
  MOE_CHECK(G > 0 && up_packed.size() == G && up_scale.size() == G && up_zero.size() == G &&
                down_packed.size() == G && down_scale.size() == G && down_zero.size() == G,
            op, "one packed/scale/zero entry per width for both projections (%zu widths)", G);
  const size_t E = expert_bits.size();
  MOE_CHECK(E > 0 && slots.size() == E, op, "expert_bits and slots need one entry per expert (%zu, %zu)", E,
            slots.size());
  up.resize(G);
  down.resize(G);
  for (size_t g = 0; g < G; ++g) {
    if (!packed_weight(ctx, op, "gate_up", up_packed[g], up_scale[g], up_zero[g], bits[g], H, 3, &up[g])) return false;
    MOE_CHECK(up[g].rows % 2 == 0 && up[g].rows == up[0].rows, op,
              "gate_up rows must be 2*I, the same for every width (width %lld has %lld)", (long long)bits[g],
              (long long)up[g].rows);
    const int64_t I = up[g].rows / 2;
    if (!packed_weight(ctx, op, "down", down_packed[g], down_scale[g], down_zero[g], bits[g], I, 3, &down[g]))
      return false;
    MOE_CHECK(down[g].experts == up[g].experts && down[g].rows == H, op,
              "down stack of width %lld must be [%lld, %lld, %lld]", (long long)bits[g], (long long)up[g].experts,
              (long long)H, (long long)(I * bits[g] / 8));
  }
  group_of.assign(E, -1);
  slot_of.assign(E, 0);
  for (size_t e = 0; e < E; ++e) {
    for (size_t g = 0; g < G; ++g) {
      if (bits[g] == expert_bits[e]) group_of[e] = int32_t(g);
    }
    MOE_CHECK(group_of[e] >= 0, op, "expert %zu has width %lld, which no width group holds", e,
              (long long)expert_bits[e]);
    MOE_CHECK(slots[e] >= 0 && slots[e] < up[group_of[e]].experts, op,
              "slot %lld of expert %zu is outside its %lld-bit group of %lld", (long long)slots[e], e,
              (long long)expert_bits[e], (long long)up[group_of[e]].experts);
    slot_of[e] = int32_t(slots[e]);
  }
  const int64_t* ids = topk_ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < topk_ids.numel(); ++i) {
    MOE_CHECK(ids[i] >= 0 && ids[i] < int64_t(E), op, "topk_ids holds expert %lld; the block has %zu experts",
              (long long)ids[i], E);
  }
  return true;
}

Tensor& mixed_width_moe_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& topk_ids,
                            const Tensor& topk_weights, ArrayRef<Tensor> up_packed, ArrayRef<Tensor> up_scale,
                            ArrayRef<OptTensor> up_zero, ArrayRef<Tensor> down_packed, ArrayRef<Tensor> down_scale,
                            ArrayRef<OptTensor> down_zero, ArrayRef<int64_t> bits, ArrayRef<int64_t> expert_bits,
                            ArrayRef<int64_t> slots, int64_t accuracy, Tensor& out) {
  std::vector<core::PackedWeight> up, down;
  std::vector<int32_t> group_of, slot_of;
  core::Accuracy acc;
  if (!check_moe(ctx, x, topk_ids, topk_weights, up_packed, up_scale, up_zero, down_packed, down_scale, down_zero,
                 bits, expert_bits, slots, up, down, group_of, slot_of) ||
      !accuracy_of(ctx, "mixed_width_moe", accuracy, &acc) ||
      !resize_out(ctx, "mixed_width_moe", out, x.sizes())) {
    return out;
  }
  core::moe_ffn(x.const_data_ptr<float>(), x.size(0), x.size(1), topk_ids.const_data_ptr<int64_t>(),
                topk_weights.const_data_ptr<float>(), topk_ids.size(1), group_of.data(), slot_of.data(), up.data(),
                down.data(), int32_t(up.size()), out.mutable_data_ptr<float>(), acc, EtParallel{});
  return out;
}

bool linear_input(KernelRuntimeContext& ctx, const char* op, const Tensor& x) {
  if (!float_tensor(ctx, op, "x", x)) return false;
  MOE_CHECK(x.dim() >= 1 && x.size(x.dim() - 1) > 0, op, "x must be [..., K] with K > 0");
  return true;
}

Tensor& packed_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& packed, const Tensor& scale,
                          const OptTensor& zero, int64_t bits, int64_t accuracy, Tensor& out) {
  const char* op = "packed_linear";
  core::PackedWeight w;
  core::Accuracy acc;
  if (!linear_input(ctx, op, x)) return out;
  const int64_t K = x.size(x.dim() - 1);
  if (!packed_weight(ctx, op, "weight", packed, scale, zero, bits, K, 2, &w) || !accuracy_of(ctx, op, accuracy, &acc))
    return out;
  executorch::aten::SizesType sizes[executorch::runtime::kTensorDimensionLimit];
  for (ssize_t d = 0; d + 1 < x.dim(); ++d) sizes[d] = x.size(d);
  sizes[x.dim() - 1] = executorch::aten::SizesType(w.rows);
  if (!resize_out(ctx, op, out, {sizes, size_t(x.dim())})) return out;
  core::packed_linear(x.const_data_ptr<float>(), x.numel() / K, w, out.mutable_data_ptr<float>(), acc,
                      EtParallel{});
  return out;
}

bool embedding_args(KernelRuntimeContext& ctx, const Tensor& ids, const Tensor& packed, const Tensor& scale,
                    const OptTensor& zero, int64_t bits, core::PackedWeight* w) {
  const char* op = "packed_embedding";
  MOE_CHECK(ids.scalar_type() == ScalarType::Long && executorch::runtime::tensor_is_contiguous(ids) &&
                size_t(ids.dim()) < executorch::runtime::kTensorDimensionLimit,
            op, "ids must be a contiguous int64 tensor");
  MOE_CHECK(bits >= 1 && bits <= 8 && packed.dim() == 2, op, "the table must be uint8 [V, H*b/8] with b in 1..8");
  if (!packed_weight(ctx, op, "table", packed, scale, zero, bits, packed.size(1) * 8 / bits, 2, w)) return false;
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    MOE_CHECK(id[i] >= 0 && id[i] < w->rows, op, "id %lld is outside the table of %lld rows", (long long)id[i],
              (long long)w->rows);
  }
  return true;
}

Tensor& packed_embedding_out(KernelRuntimeContext& ctx, const Tensor& ids, const Tensor& packed, const Tensor& scale,
                             const OptTensor& zero, int64_t bits, Tensor& out) {
  core::PackedWeight w;
  core::Accuracy unused;
  if (!embedding_args(ctx, ids, packed, scale, zero, bits, &w) || !accuracy_of(ctx, "packed_embedding", 0, &unused))
    return out;
  const int64_t* id = ids.const_data_ptr<int64_t>();
  executorch::aten::SizesType sizes[executorch::runtime::kTensorDimensionLimit];
  for (ssize_t d = 0; d < ids.dim(); ++d) sizes[d] = ids.size(d);
  sizes[ids.dim()] = executorch::aten::SizesType(w.cols);
  if (!resize_out(ctx, "packed_embedding", out, {sizes, size_t(ids.dim()) + 1})) return out;
  core::packed_gather(id, ids.numel(), w, out.mutable_data_ptr<float>());
  return out;
}

}  // namespace moe_export_et

EXECUTORCH_LIBRARY(moe_export, "mixed_width_moe.out", moe_export_et::mixed_width_moe_out);
EXECUTORCH_LIBRARY(moe_export, "packed_linear.out", moe_export_et::packed_linear_out);
EXECUTORCH_LIBRARY(moe_export, "packed_embedding.out", moe_export_et::packed_embedding_out);

// For the Python loader and the benchmarks: which vector path the core's run-time dispatch picked.
extern "C" const char* moe_export_et_kernel_path() { return moe_export_core::kernel_path(); }

// For runners: while on, a program's delegates initialised on this thread (XNNPACK, at load_method) take no
// threadpool and run on the calling thread; returns the previous setting. The native .pte's runner loads its
// methods this way (see RowPool); a C++ runner does the same with executorch::extension::threadpool::NoThreadPoolGuard.
extern "C" int moe_export_et_serial_delegates(int on) {
#ifdef ET_USE_THREADPOOL
  using executorch::extension::threadpool::NoThreadPoolGuard;
  const int before = NoThreadPoolGuard::is_enabled() ? 1 : 0;
  NoThreadPoolGuard::set_enabled(on != 0);
  return before;
#else
  (void)on;  // no threadpool: delegates run on the caller anyway
  return 1;
#endif
}

// How many threads the latest op that split its rows ran on (0: no op has split yet; ops of one thread or one block
// of rows run on the caller alone and leave it as it was).
extern "C" int moe_export_et_split_threads() { return moe_export_et::RowPool::last_threads(); }
