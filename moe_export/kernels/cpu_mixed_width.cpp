// The torch extension around the kernel core (core/mixed_width.h): tensor checks, the dispatcher ops and
// ATen's parallel loop. The arithmetic lives in the core, which the ExecuTorch kernel library compiles too.
//
//   moe_export::cpu_mixed_width_gemv  (Python op, cpu_ops.py)  one width group's routed mat-vec
//   moe_export::cpu_moe_ffn            the routed-expert SwiGLU FFN of one MoE layer, every width group
//   moe_export::cpu_packed_linear      x @ W.T for one packed 2-D weight (quantized attention, lm_head, ...)
//
// The two dispatcher ops are registered from C++ (TORCH_LIBRARY_FRAGMENT below), so a compiled graph calls
// the kernel with no Python function between inductor's wrapper and the core. Built by
// moe_export.kernels.cpu_ops with load_inline, for the baseline ISA: the core picks its vector path at run
// time (kernel_path()).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <mutex>
#include <set>
#include <thread>

#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "core/mixed_width.h"

namespace core = moe_export_core;

namespace {

// The host's parallel loop for the core: output-row blocks across ATen's intra-op threads.
struct AtenPar {
  template <class Fn>
  void operator()(int64_t begin, int64_t end, Fn&& fn) const {
    at::parallel_for(begin, end, 1, fn);
  }
};

// How many threads AtenPar spreads n blocks over: at::parallel_for is a header template that splits work only in
// a build with OpenMP (-fopenmp, as ATen's own); without it the loop runs on the caller alone, silently.
int64_t parallel_threads(int64_t n) {
  std::mutex m;
  std::set<std::thread::id> ids;
  AtenPar{}(0, n, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(m);
    ids.insert(std::this_thread::get_id());
  });
  return int64_t(ids.size());
}

void check_path() { TORCH_CHECK(core::path_error() == nullptr, "moe_export CPU kernels: ", core::path_error()); }

const uint16_t* half_bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }

core::Accuracy accuracy_of(int64_t a, const char* op) {
  TORCH_CHECK(a == 0 || a == 1, op, ": accuracy must be 0 (exact) or 1 (int8), got ", a);
  return static_cast<core::Accuracy>(a);
}

}  // namespace

bool has_simd() { return core::has_simd(); }

std::string kernel_path() {
  check_path();
  return core::kernel_path();
}

// Switch the core's vector path for this process ("" = back to MOE_EXPORT_CPU_PATH / the CPU's best).
void set_kernel_path(const std::string& name) {
  const char* err = core::set_path(name.c_str());
  TORCH_CHECK(err == nullptr, "moe_export CPU kernels: cannot use path '", name, "': ", err);
}

bool path_available(const std::string& name) {
  for (core::Path p : {core::Path::Scalar, core::Path::Avx2, core::Path::AvxVnni, core::Path::Avx512Vnni})
    if (name == core::path_name(p)) return core::detail::cpu_has(p);
  return false;
}

// x f32 [S, K]; idx int64 [S] (slot in the group, -1 = skip); packed u8 [E_b, N, K*b/8];
// scale f16 [E_b, N, G]; zero f16 [E_b, N, G] or undefined (symmetric: every zero is zconst). -> f32 [S, N]
at::Tensor mixed_width_gemv(at::Tensor x, at::Tensor idx, at::Tensor packed, at::Tensor scale,
                            c10::optional<at::Tensor> zero, int64_t bits, double zconst) {
  check_path();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [S, K]");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.size(0) == x.size(0),
              "idx must be int64 [S]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte, "packed must be uint8 [E_b, N, K*b/8]");
  TORCH_CHECK(scale.dim() == 3 && scale.scalar_type() == at::kHalf, "scale must be float16 [E_b, N, G]");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8, got ", bits);
  TORCH_CHECK(float(zconst) == core::symmetric_zero(int(bits)), "zconst must be the symmetric zero of ", bits, " bits");
  const int64_t S = x.size(0), K = x.size(1), E = packed.size(0), N = packed.size(1), G = scale.size(2);
  TORCH_CHECK(packed.size(2) * 8 == K * bits, "packed row bytes ", packed.size(2), " != K*b/8 for K=", K, " b=", bits);
  TORCH_CHECK(scale.size(0) == E && scale.size(1) == N && G > 0 && K % G == 0 && (K / G) % 8 == 0,
              "scale must be [E_b, N, G] with K/G a multiple of 8");
  const bool has_zero = zero.has_value() && zero->defined();
  if (has_zero) TORCH_CHECK(zero->sizes() == scale.sizes() && zero->scalar_type() == at::kHalf, "zero must match scale");
  auto xc = x.contiguous();
  auto ic = idx.contiguous();
  auto pc = packed.contiguous();
  auto sc = scale.contiguous();
  at::Tensor zc = has_zero ? zero->contiguous() : at::Tensor();
  auto i_ptr = ic.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(i_ptr[s] < E, "idx[", s, "] = ", i_ptr[s], " >= E_b = ", E);
  core::PackedWeight w;
  w.codes = pc.data_ptr<uint8_t>();
  w.scale = half_bits(sc);
  w.zero = has_zero ? half_bits(zc) : nullptr;
  w.bits = int32_t(bits);
  w.experts = E, w.rows = N, w.cols = K, w.group = K / G;
  auto xsum = xc.view({S, G, K / G}).sum(-1).contiguous();  // [S, G], of the unscaled x
  if (core::gather_prescaled(w)) {  // lane j of every 8 meets code * 2^(j*b): scale x by 2^-(j*b) (exact)
    auto lane = at::arange(8, x.options()).mul(-double(bits)).exp2();  // [8]
    xc = (xc.view({S, K / 8, 8}) * lane).view({S, K}).contiguous();
  }
  auto out = at::zeros({S, N}, x.options());
  core::gather_gemv(xc.data_ptr<float>(), xsum.data_ptr<float>(), i_ptr, S, w, out.data_ptr<float>(), AtenPar{});
  return out;
}

namespace {

// One packed weight from its tensors: widths 1..8, contiguous, scale (and zero) [(E_b,) N, G] in fp16.
core::PackedWeight make_weight(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                               int64_t bits, int64_t k, const char* what) {
  TORCH_CHECK(bits >= 1 && bits <= 8, what, ": bits must be in 1..8, got ", bits);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() >= 2,
              what, ": packed must be contiguous uint8 [(E_b,) N, K*b/8], got ", packed.scalar_type(), " ",
              packed.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.dim() == packed.dim(),
              what, ": scale must be contiguous float16 with packed's rank, got ", scale.scalar_type(), " ",
              scale.sizes());
  const int d = packed.dim();
  TORCH_CHECK(packed.size(d - 1) * 8 == k * bits, what, ": packed rows hold ", packed.size(d - 1),
              " bytes, K*b/8 = ", k * bits / 8, " for K=", k, " b=", bits);
  for (int i = 0; i < d - 1; ++i)
    TORCH_CHECK(scale.size(i) == packed.size(i), what, ": scale ", scale.sizes(), " does not match packed ",
                packed.sizes());
  const int64_t G = scale.size(d - 1);
  TORCH_CHECK(G > 0 && k % G == 0 && (k / G) % 8 == 0, what, ": K=", k, " must split into ", G,
              " groups of a multiple of 8");
  core::PackedWeight w;
  if (zero.has_value() && zero->defined()) {
    TORCH_CHECK(zero->scalar_type() == at::kHalf && zero->is_contiguous() && zero->sizes() == scale.sizes(),
                what, ": zero must be contiguous float16 like scale ", scale.sizes());
    w.zero = half_bits(*zero);
  }
  w.codes = packed.data_ptr<uint8_t>();
  w.scale = half_bits(scale);
  w.experts = d == 3 ? packed.size(0) : 1;
  w.rows = packed.size(d - 2);
  w.cols = k;
  w.group = k / G;
  w.bits = int32_t(bits);
  return w;
}

}  // namespace

// x f32 [T, H]; topk_ids int64 [T, k]; topk_weights float [T, k]; expert_bits / slots: per expert, its width
// and its index inside that width's group; bits: the widths, one per group, in the order of the group lists.
// up_*: gate_up stacks [E_b, 2I, H*b/8] (gate rows first, then up rows); down_*: [E_b, H, I*b/8]. -> f32 [T, H]
at::Tensor moe_ffn(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                   std::vector<int64_t> expert_bits, std::vector<int64_t> slots, std::vector<int64_t> bits,
                   std::vector<at::Tensor> up_packed, std::vector<at::Tensor> up_scale,
                   std::vector<c10::optional<at::Tensor>> up_zero, std::vector<at::Tensor> down_packed,
                   std::vector<at::Tensor> down_scale, std::vector<c10::optional<at::Tensor>> down_zero,
                   int64_t accuracy) {
  const char* op = "moe_export::cpu_moe_ffn";
  check_path();
  const core::Accuracy acc = accuracy_of(accuracy, op);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, ": x must be float32 [T, H], got ",
              x.scalar_type(), " ", x.sizes());
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.scalar_type() == at::kLong && topk_ids.size(0) == T, op,
              ": topk_ids must be int64 [T=", T, ", k], got ", topk_ids.scalar_type(), " ", topk_ids.sizes());
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes() && at::isFloatingType(topk_weights.scalar_type()), op,
              ": topk_weights must be a float tensor shaped like topk_ids ", topk_ids.sizes(), ", got ",
              topk_weights.scalar_type(), " ", topk_weights.sizes());
  const size_t n_groups = bits.size();
  TORCH_CHECK(n_groups > 0 && up_packed.size() == n_groups && up_scale.size() == n_groups &&
                  up_zero.size() == n_groups && down_packed.size() == n_groups && down_scale.size() == n_groups &&
                  down_zero.size() == n_groups,
              op, ": one packed/scale/zero entry per width for both projections (", n_groups, " widths)");
  const int64_t E = int64_t(expert_bits.size());
  TORCH_CHECK(E > 0 && int64_t(slots.size()) == E, op, ": expert_bits and slots need one entry per expert");
  std::vector<core::PackedWeight> up(n_groups), down(n_groups);
  int64_t I = -1;
  for (size_t gi = 0; gi < n_groups; ++gi) {
    TORCH_CHECK(up_packed[gi].dim() == 3 && down_packed[gi].dim() == 3, op,
                ": expert stacks must be 3-D [E_b, N, K*b/8]");
    up[gi] = make_weight(up_packed[gi], up_scale[gi], up_zero[gi], bits[gi], H, "cpu_moe_ffn gate_up");
    TORCH_CHECK(up[gi].rows % 2 == 0 && (I < 0 || up[gi].rows == 2 * I), op,
                ": gate_up rows must be 2*I, the same for every width");
    I = up[gi].rows / 2;
    down[gi] = make_weight(down_packed[gi], down_scale[gi], down_zero[gi], bits[gi], I, "cpu_moe_ffn down");
    TORCH_CHECK(down[gi].rows == H && down[gi].experts == up[gi].experts, op, ": down stack of width ", bits[gi],
                " is ", down_packed[gi].sizes(), ", expected [", up[gi].experts, ", ", H, ", ", I * bits[gi] / 8, "]");
    for (size_t gj = 0; gj < gi; ++gj) TORCH_CHECK(bits[gj] != bits[gi], op, ": width ", bits[gi], " listed twice");
  }
  std::vector<int32_t> group_of(E), slot_of(E);
  for (int64_t e = 0; e < E; ++e) {
    int found = -1;
    for (size_t gi = 0; gi < n_groups; ++gi)
      if (bits[gi] == expert_bits[e]) found = int(gi);
    TORCH_CHECK(found >= 0, op, ": expert ", e, " has width ", expert_bits[e], ", which has no group");
    TORCH_CHECK(slots[e] >= 0 && slots[e] < up[found].experts, op, ": expert ", e, " slot ", slots[e],
                " outside its group of ", up[found].experts);
    group_of[e] = found;
    slot_of[e] = int32_t(slots[e]);
  }
  auto xc = x.contiguous();
  auto ic = topk_ids.contiguous();
  auto wc = topk_weights.to(at::kFloat).contiguous();
  const int64_t k = ic.size(1), S = T * k;
  const int64_t* ids = ic.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(ids[s] >= 0 && ids[s] < E, op, ": topk_ids[", s / k, ", ", s % k, "] = ", ids[s],
                " outside [0, ", E, ")");
  auto out = at::empty({T, H}, x.options());
  core::moe_ffn(xc.data_ptr<float>(), T, H, ids, wc.data_ptr<float>(), k, group_of.data(), slot_of.data(), up.data(),
                down.data(), int32_t(n_groups), out.data_ptr<float>(), acc, AtenPar{});
  return out;
}

// x f32 [..., K]; packed u8 [N, K*b/8]; scale f16 [N, G]; zero f16 [N, G] or undefined -> f32 [..., N]
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                         c10::optional<at::Tensor> zero, int64_t bits, int64_t accuracy) {
  const char* op = "moe_export::cpu_packed_linear";
  check_path();
  const core::Accuracy acc = accuracy_of(accuracy, op);
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, op, ": x must be float32 [..., K], got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(packed.dim() == 2, op, ": packed must be uint8 [N, K*b/8], got ", packed.sizes());
  const int64_t K = x.size(-1);
  core::PackedWeight w = make_weight(packed, scale, zero, bits, K, op);
  auto xc = x.contiguous();
  const int64_t M = K == 0 ? 0 : xc.numel() / K;
  auto sizes = x.sizes().vec();
  sizes.back() = w.rows;
  auto out = at::empty(sizes, x.options());
  core::packed_linear(xc.data_ptr<float>(), M, w, out.data_ptr<float>(), acc, AtenPar{});
  return out;
}

// ids int64 [n]; packed u8 [V, K*b/8]; scale/zero f16 [V, G] -> f32 [n, K]: embedding rows, exact dequantize.
at::Tensor packed_gather(const at::Tensor& ids, const at::Tensor& packed, const at::Tensor& scale,
                         c10::optional<at::Tensor> zero, int64_t bits, int64_t k) {
  const char* op = "moe_export::packed_gather";
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ids must be int64");
  TORCH_CHECK(packed.dim() == 2, op, ": packed must be uint8 [V, K*b/8], got ", packed.sizes());
  core::PackedWeight w = make_weight(packed, scale, zero, bits, k, op);
  auto ic = ids.contiguous();
  const int64_t n = ic.numel();
  const int64_t* ip = ic.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < w.rows, op, ": id ", ip[i], " outside [0, ", w.rows, ")");
  auto sizes = ids.sizes().vec();
  sizes.push_back(k);
  auto out = at::empty(sizes, packed.options().dtype(at::kFloat));
  core::packed_gather(ip, n, w, out.data_ptr<float>());
  return out;
}

#ifndef MOE_EXPORT_NO_OPS
namespace {
at::Tensor moe_ffn_op(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                      at::IntArrayRef expert_bits, at::IntArrayRef slots, at::IntArrayRef bits,
                      at::TensorList up_packed, at::TensorList up_scale,
                      const c10::List<c10::optional<at::Tensor>>& up_zero, at::TensorList down_packed,
                      at::TensorList down_scale, const c10::List<c10::optional<at::Tensor>>& down_zero,
                      int64_t accuracy) {
  auto opt = [](const c10::List<c10::optional<at::Tensor>>& l) {
    std::vector<c10::optional<at::Tensor>> v;
    v.reserve(l.size());
    for (size_t i = 0; i < l.size(); ++i) v.push_back(l.get(i));
    return v;
  };
  return moe_ffn(x, topk_ids, topk_weights, expert_bits.vec(), slots.vec(), bits.vec(), up_packed.vec(),
                 up_scale.vec(), opt(up_zero), down_packed.vec(), down_scale.vec(), opt(down_zero), accuracy);
}

at::Tensor packed_linear_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& zero, int64_t bits, int64_t accuracy) {
  return packed_linear(x, packed, scale, zero, bits, accuracy);
}
}  // namespace

// accuracy: 0 = exact (fp32 activations), 1 = int8 activations (core/mixed_width.h).
TORCH_LIBRARY_FRAGMENT(moe_export, m) {
  m.def("cpu_moe_ffn(Tensor x, Tensor topk_ids, Tensor topk_weights, int[] expert_bits, int[] slots, int[] bits, "
        "Tensor[] up_packed, Tensor[] up_scale, Tensor?[] up_zero, Tensor[] down_packed, Tensor[] down_scale, "
        "Tensor?[] down_zero, int accuracy=0) -> Tensor");
  m.def("cpu_packed_linear(Tensor x, Tensor packed, Tensor scale, Tensor? zero, int bits, int accuracy=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_export, CPU, m) {
  m.impl("cpu_moe_ffn", &moe_ffn_op);
  m.impl("cpu_packed_linear", &packed_linear_op);
}
#endif
