// Mixed-width expert mat-vec on CPU: y[s, n] = W[idx[s]][n, :] . x[s, :] straight from the packed bytes.
//
//   y[s, n] = sum_g scale[e,n,g] * (sum_{k in g} q[e,n,k] * x[s,k] - zero[e,n,g] * sum_{k in g} x[s,k])
//
// for the routed (token, expert) pairs s of ONE width group (idx[s] = slot inside the group, -1 = the pair's
// expert lives in another group: row left at zero). Codes are an LSB-first bit stream, 8 codes per b bytes
// (docs/architecture.md), so 8 codes of b <= 4 bits are one little-endian word of b bytes: broadcast it to
// 8 lanes, shift lane j right by j*b, mask, convert, FMA with 8 activations. Nothing float-sized is
// written for the weight; the only memory traffic is the packed stream plus scale/zero.
//
// The scale is folded in per group as a vector FMA (y_vec += scale * acc_vec) and the zero term as one
// scalar per group, so a row needs a single horizontal sum at the end.
//
// Built by moe_export.kernels.cpu_ops with load_inline; -mavx2 -mfma only when /proc/cpuinfo has them,
// otherwise the scalar path below (same arithmetic, different summation order).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && !defined(MOE_EXPORT_NO_SIMD)
#include <immintrin.h>
#define MOE_EXPORT_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define MOE_EXPORT_AVX512 1  // the fused ops' 16-lane path (vpmultishiftqb cuts codes out of a 64-bit word)
#endif
#endif

namespace {

// 8 codes of B bits (B <= 4) as one little-endian word; code j sits at bits j*B .. j*B+B-1.
template <int B>
inline uint32_t load_unit(const uint8_t* p) {
  if constexpr (B == 1) {
    return p[0];
  } else if constexpr (B == 2) {
    uint16_t w;
    std::memcpy(&w, p, 2);
    return w;
  } else if constexpr (B == 3) {  // a 3-byte memcpy does not become one load: assemble it
    uint16_t lo;
    std::memcpy(&lo, p, 2);
    return uint32_t(lo) | (uint32_t(p[2]) << 16);
  } else {
    uint32_t w;
    std::memcpy(&w, p, 4);
    return w;
  }
}

template <int B>
inline float row_dot_scalar(const uint8_t* prow, const at::Half* srow, const at::Half* zrow, float zconst,
                            const float* x, const float* xsum, int64_t n_groups, int64_t g) {
  float y = 0.f;
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const uint8_t* p = prow + gi * (g * B / 8);
    const float* xg = x + gi * g;
    float acc = 0.f;
    if constexpr (B == 8) {
      for (int64_t k = 0; k < g; ++k) acc += float(p[k]) * xg[k];
    } else {
      constexpr uint32_t mask = (1u << B) - 1u;
      for (int64_t u = 0; u < g / 8; ++u) {
        const uint32_t w = load_unit<B>(p + u * B);
        for (int j = 0; j < 8; ++j) acc += float((w >> (j * B)) & mask) * xg[u * 8 + j];
      }
    }
    const float s = static_cast<float>(srow[gi]);
    const float z = zrow ? static_cast<float>(zrow[gi]) : zconst;
    y += s * (acc - z * xsum[gi]);
  }
  return y;
}

#ifdef MOE_EXPORT_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// Widths whose 8 codes fit in 24 bits skip the shift: lane j keeps its code in place (w & (mask << j*B)),
// i.e. q * 2^(j*B), exact in float; the activations were pre-scaled by 2^-(j*B) (``prescale``), so the
// product is unchanged and only the summation differs from the reference.
template <int B>
constexpr bool kInPlace = B <= 3;

template <int B, bool FAST>
inline __m256 codes8(const uint8_t* p, __m256i shifts, __m256i mask) {
  if constexpr (B == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  } else {
    uint32_t u;
    if constexpr (FAST && B == 3) {
      std::memcpy(&u, p, 4);  // reads one byte past the unit: callers keep it inside the row
    } else {
      u = load_unit<B>(p);
    }
    const __m256i w = _mm256_set1_epi32(static_cast<int>(u));
    if constexpr (kInPlace<B>) return _mm256_cvtepi32_ps(_mm256_and_si256(w, mask));
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, shifts), mask));
  }
}

template <int B>
inline float row_dot_avx2(const uint8_t* prow, const at::Half* srow, const at::Half* zrow, float zconst,
                          const float* x, const float* xsum, int64_t n_groups, int64_t g) {
  constexpr int SH = B == 8 ? 0 : B;
  const __m256i shifts = _mm256_setr_epi32(0, SH, 2 * SH, 3 * SH, 4 * SH, 5 * SH, 6 * SH, 7 * SH);
  constexpr int M = B == 8 ? 0xff : (1 << B) - 1;
  const __m256i mask = kInPlace<B> ? _mm256_setr_epi32(M, M << SH, M << 2 * SH, M << 3 * SH, M << 4 * SH,
                                                        M << 5 * SH, M << 6 * SH, M << 7 * SH)
                                   : _mm256_set1_epi32(M);
  const int64_t units = g / 8;  // 8 codes = B bytes
  __m256 y = _mm256_setzero_ps();
  float corr = 0.f;
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const uint8_t* p = prow + gi * units * B;
    const float* xg = x + gi * g;
    // two chains hide the FMA latency
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    const int64_t fast_units = gi == n_groups - 1 ? units - 1 : units;  // the row's last unit: exact-size load
    int64_t u = 0;
    for (; u + 2 <= fast_units; u += 2) {
      a0 = _mm256_fmadd_ps(codes8<B, true>(p + u * B, shifts, mask), _mm256_loadu_ps(xg + u * 8), a0);
      a1 = _mm256_fmadd_ps(codes8<B, true>(p + (u + 1) * B, shifts, mask), _mm256_loadu_ps(xg + u * 8 + 8), a1);
    }
    for (; u < units; ++u)
      a0 = _mm256_fmadd_ps(codes8<B, false>(p + u * B, shifts, mask), _mm256_loadu_ps(xg + u * 8), a0);
    const float s = static_cast<float>(srow[gi]);
    const float z = zrow ? static_cast<float>(zrow[gi]) : zconst;
    y = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_add_ps(a0, a1), y);
    corr += s * z * xsum[gi];
  }
  return hsum(y) - corr;
}

// R pairs routed to the same expert (decode with T > 1): unpack each code vector once, FMA it with R inputs.
template <int B, int R>
inline void rows_dot_avx2(const uint8_t* prow, const at::Half* srow, const at::Half* zrow, float zconst,
                          const float* const* x, const float* const* xsum, float* const* out, int64_t n_groups,
                          int64_t g) {
  constexpr int SH = B == 8 ? 0 : B;
  const __m256i shifts = _mm256_setr_epi32(0, SH, 2 * SH, 3 * SH, 4 * SH, 5 * SH, 6 * SH, 7 * SH);
  constexpr int M = B == 8 ? 0xff : (1 << B) - 1;
  const __m256i mask = kInPlace<B> ? _mm256_setr_epi32(M, M << SH, M << 2 * SH, M << 3 * SH, M << 4 * SH,
                                                        M << 5 * SH, M << 6 * SH, M << 7 * SH)
                                   : _mm256_set1_epi32(M);
  const int64_t units = g / 8;
  __m256 y[R];
  float corr[R];
  for (int r = 0; r < R; ++r) y[r] = _mm256_setzero_ps(), corr[r] = 0.f;
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const uint8_t* p = prow + gi * units * B;
    __m256 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
    const int64_t fast_units = gi == n_groups - 1 ? units - 1 : units;
    int64_t u = 0;
    for (; u < fast_units; ++u) {
      const __m256 c = codes8<B, true>(p + u * B, shifts, mask);
      for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(c, _mm256_loadu_ps(x[r] + gi * g + u * 8), a[r]);
    }
    for (; u < units; ++u) {
      const __m256 c = codes8<B, false>(p + u * B, shifts, mask);
      for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(c, _mm256_loadu_ps(x[r] + gi * g + u * 8), a[r]);
    }
    const float sc = static_cast<float>(srow[gi]);
    const float z = zrow ? static_cast<float>(zrow[gi]) : zconst;
    for (int r = 0; r < R; ++r) {
      y[r] = _mm256_fmadd_ps(_mm256_set1_ps(sc), a[r], y[r]);
      corr[r] += sc * z * xsum[r][gi];
    }
  }
  for (int r = 0; r < R; ++r) *out[r] = hsum(y[r]) - corr[r];
}
#endif

template <int B>
void run(const float* x, const int64_t* idx, const uint8_t* packed, const at::Half* scale, const at::Half* zero,
         float zconst, const float* xsum, float* out, int64_t S, int64_t N, int64_t K, int64_t G) {
  const int64_t g = K / G;
  const int64_t row_bytes = K * B / 8;
#ifdef MOE_EXPORT_AVX2
  // pairs grouped by expert, up to 4 per batch: a batch unpacks each weight row once
  std::vector<std::vector<int64_t>> batches;
  {
    std::vector<bool> done(S, false);
    for (int64_t s = 0; s < S; ++s) {
      if (done[s] || idx[s] < 0) continue;
      std::vector<int64_t> cur;
      for (int64_t t = s; t < S; ++t) {
        if (done[t] || idx[t] != idx[s]) continue;
        done[t] = true;
        cur.push_back(t);
        if (cur.size() == 4) batches.push_back(cur), cur.clear();
      }
      if (!cur.empty()) batches.push_back(cur);
    }
  }
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    const float* xr[4];
    const float* xsr[4];
    float* outr[4];
    for (int64_t n = n0; n < n1; ++n) {
      for (const auto& bt : batches) {
        const int64_t r = idx[bt[0]] * N + n;
        for (size_t i = 0; i < bt.size(); ++i)
          xr[i] = x + bt[i] * K, xsr[i] = xsum + bt[i] * G, outr[i] = out + bt[i] * N + n;
        const uint8_t* prow = packed + r * row_bytes;
        const at::Half* srow = scale + r * G;
        const at::Half* zrow = zero ? zero + r * G : nullptr;
        switch (bt.size()) {
          case 1: *outr[0] = row_dot_avx2<B>(prow, srow, zrow, zconst, xr[0], xsr[0], G, g); break;
          case 2: rows_dot_avx2<B, 2>(prow, srow, zrow, zconst, xr, xsr, outr, G, g); break;
          case 3: rows_dot_avx2<B, 3>(prow, srow, zrow, zconst, xr, xsr, outr, G, g); break;
          default: rows_dot_avx2<B, 4>(prow, srow, zrow, zconst, xr, xsr, outr, G, g); break;
        }
      }
    }
  });
#else
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t e = idx[s];
        if (e < 0) continue;
        const int64_t r = e * N + n;
        const uint8_t* prow = packed + r * row_bytes;
        const at::Half* srow = scale + r * G;
        const at::Half* zrow = zero ? zero + r * G : nullptr;
        out[s * N + n] = row_dot_scalar<B>(prow, srow, zrow, zconst, x + s * K, xsum + s * G, G, g);
      }
    }
  });
#endif
}

}  // namespace

bool has_simd() {
#ifdef MOE_EXPORT_AVX2
  return true;
#else
  return false;
#endif
}

// x f32 [S, K]; idx int64 [S] (slot in the group, -1 = skip); packed u8 [E_b, N, K*b/8];
// scale f16 [E_b, N, G]; zero f16 [E_b, N, G] or undefined (symmetric: every zero is zconst). -> f32 [S, N]
at::Tensor mixed_width_gemv(at::Tensor x, at::Tensor idx, at::Tensor packed, at::Tensor scale,
                            c10::optional<at::Tensor> zero, int64_t bits, double zconst) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [S, K]");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.size(0) == x.size(0),
              "idx must be int64 [S]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte, "packed must be uint8 [E_b, N, K*b/8]");
  TORCH_CHECK(scale.dim() == 3 && scale.scalar_type() == at::kHalf, "scale must be float16 [E_b, N, G]");
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
  auto xsum = xc.view({S, G, K / G}).sum(-1).contiguous();  // [S, G], of the unscaled x
#ifdef MOE_EXPORT_AVX2
  if (bits <= 3) {  // lane j of every 8 meets code * 2^(j*b): scale x by 2^-(j*b) (exact)
    auto lane = at::arange(8, x.options()).mul(-double(bits)).exp2();  // [8]
    xc = (xc.view({S, K / 8, 8}) * lane).view({S, K}).contiguous();
  }
#endif
  auto out = at::zeros({S, N}, x.options());
  const at::Half* z_ptr = has_zero ? zc.data_ptr<at::Half>() : nullptr;
#define MOE_EXPORT_RUN(B_)                                                                                     \
  run<B_>(xc.data_ptr<float>(), i_ptr, pc.data_ptr<uint8_t>(), sc.data_ptr<at::Half>(), z_ptr, float(zconst), \
          xsum.data_ptr<float>(), out.data_ptr<float>(), S, N, K, G)
  switch (bits) {
    case 1: MOE_EXPORT_RUN(1); break;
    case 2: MOE_EXPORT_RUN(2); break;
    case 3: MOE_EXPORT_RUN(3); break;
    case 4: MOE_EXPORT_RUN(4); break;
    case 8: MOE_EXPORT_RUN(8); break;
    default: TORCH_CHECK(false, "bits must be 1, 2, 3, 4 or 8, got ", bits);
  }
#undef MOE_EXPORT_RUN
  return out;
}

// ------------------------------------------------------------------------------------------------------
// Fused decode ops, registered with the dispatcher (TORCH_LIBRARY_FRAGMENT below) so a compiled graph calls
// C++ directly, with no Python function between inductor's wrapper and the kernel:
//
//   moe_export::cpu_moe_ffn       the routed-expert SwiGLU FFN of one MoE layer: for every (token, expert) pair,
//                                 gate_up mat-vec -> SiLU(gate) * up -> down mat-vec, weighted and summed over
//                                 the top-k pairs; every width group of the layer in one call.
//   moe_export::cpu_packed_linear x @ W.T for one packed 2-D weight (quantized attention, lm_head, ...).
//
// Both read the packed bytes in place (the same row kernels as mixed_width_gemv) and keep every
// intermediate (prescaled inputs, group sums, the gate_up output, per-pair outputs) in reused
// thread-local scratch, so a call allocates only its output.

namespace {

struct Group {
  const uint8_t* packed = nullptr;  // [E_b, N, K*b/8]
  const at::Half* scale = nullptr;  // [E_b, N, G]
  const at::Half* zero = nullptr;   // [E_b, N, G] or null (symmetric)
  int64_t E = 0, N = 0, K = 0, G = 0;
  int bits = 0;
  float zconst = 0.f;
};

float symmetric_zero(int bits) { return bits == 1 ? 0.5f : float(1 << (bits - 1)); }

bool kernel_width(int64_t b) { return b == 1 || b == 2 || b == 3 || b == 4 || b == 8; }

Group make_group(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                 int64_t bits, int64_t k, const char* what) {
  TORCH_CHECK(kernel_width(bits), what, ": bits must be 1, 2, 3, 4 or 8, got ", bits);
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
  Group w;
  if (zero.has_value() && zero->defined()) {
    TORCH_CHECK(zero->scalar_type() == at::kHalf && zero->is_contiguous() && zero->sizes() == scale.sizes(),
                what, ": zero must be contiguous float16 like scale ", scale.sizes());
    w.zero = zero->data_ptr<at::Half>();
  }
  w.packed = packed.data_ptr<uint8_t>();
  w.scale = scale.data_ptr<at::Half>();
  w.E = d == 3 ? packed.size(0) : 1;
  w.N = packed.size(d - 2);
  w.K = k;
  w.G = G;
  w.bits = int(bits);
  w.zconst = symmetric_zero(int(bits));
  return w;
}

#ifdef MOE_EXPORT_AVX512
typedef long long u64_unaligned __attribute__((may_alias, aligned(1)));
typedef int u32_unaligned __attribute__((may_alias, aligned(1)));

// 16 codes of B bits (2B bytes; B <= 4 from one 64-bit word, B = 8 from 16 bytes) as 16 floats. Dword lane j
// takes the byte that starts at bit j*B of the word (vpmultishiftqb) and masks it to B bits, so every width
// costs the same few instructions and nothing is pre-scaled. 1- and 3-bit units are read 2 bytes long unless
// SAFE (a row's last unit), so the extra bytes stay inside the row.
template <int B, bool SAFE>
inline __m512 codes16(const uint8_t* p, __m512i ctrl, __m512i mask) {
  if constexpr (B == 8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  } else {
    // Broadcast straight from memory (a load-port uop; a broadcast from a register costs a shuffle-port
    // uop, the port vpmultishiftqb needs). Only the 2B bytes of the unit are ever used.
    __m512i v;
    if constexpr (B == 4 || (B == 3 && !SAFE)) {
      v = _mm512_set1_epi64(*reinterpret_cast<const u64_unaligned*>(p));  // 3 bits: 2 bytes past the unit
    } else if constexpr (B == 2 || (B == 1 && !SAFE)) {
      v = _mm512_set1_epi32(*reinterpret_cast<const u32_unaligned*>(p));  // 1 bit: 2 bytes past the unit
    } else {
      uint64_t w = 0;
      std::memcpy(&w, p, 2 * B);
      v = _mm512_set1_epi64(static_cast<long long>(w));
    }
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, v), mask));
  }
}

template <int B>
inline __m512i multishift_ctrl() {
  alignas(64) uint8_t c[64];
  for (int j = 0; j < 16; ++j)
    for (int i = 0; i < 4; ++i) c[4 * j + i] = uint8_t(((j * B) & 63) + 8 * i);
  return _mm512_load_si512(c);
}

// NR (<= 4) consecutive weight rows against one input row: NR independent FMA chains share each x load.
template <int B, int NR>
inline void tile_512(const uint8_t* prow, int64_t row_bytes, const at::Half* srow, const at::Half* zrow, int64_t G,
                     float zconst, const float* x, const float* xsum, int64_t n_groups, int64_t g, float* out) {
  const __m512i ctrl = multishift_ctrl<B>();
  const __m512i mask = _mm512_set1_epi32(B == 8 ? 0xff : (1 << B) - 1);
  const int64_t units = g / 16;
  __m512 y[NR];
  float corr[NR];
  for (int r = 0; r < NR; ++r) y[r] = _mm512_setzero_ps(), corr[r] = 0.f;
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    __m512 a[NR];
    for (int r = 0; r < NR; ++r) a[r] = _mm512_setzero_ps();
    const float* xg = x + gi * g;
    const int64_t fast_units = gi == n_groups - 1 ? units - 1 : units;
    int64_t u = 0;
    for (; u < fast_units; ++u) {
      const __m512 xv = _mm512_loadu_ps(xg + u * 16);
      for (int r = 0; r < NR; ++r)
        a[r] = _mm512_fmadd_ps(codes16<B, false>(prow + r * row_bytes + (gi * units + u) * 2 * B, ctrl, mask), xv, a[r]);
    }
    for (; u < units; ++u) {
      const __m512 xv = _mm512_loadu_ps(xg + u * 16);
      for (int r = 0; r < NR; ++r)
        a[r] = _mm512_fmadd_ps(codes16<B, true>(prow + r * row_bytes + (gi * units + u) * 2 * B, ctrl, mask), xv, a[r]);
    }
    for (int r = 0; r < NR; ++r) {
      const float sc = static_cast<float>(srow[r * G + gi]);
      const float z = zrow ? static_cast<float>(zrow[r * G + gi]) : zconst;
      y[r] = _mm512_fmadd_ps(_mm512_set1_ps(sc), a[r], y[r]);
      corr[r] += sc * z * xsum[gi];
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(y[r]) - corr[r];
}

// One weight row against R (<= 8) input rows (pairs of one expert): the codes are cut once for all R.
template <int B, int R>
inline void rows_512(const uint8_t* prow, const at::Half* srow, const at::Half* zrow, float zconst,
                     const float* const* x, const float* const* xsum, int64_t n_groups, int64_t g, float* const* out) {
  const __m512i ctrl = multishift_ctrl<B>();
  const __m512i mask = _mm512_set1_epi32(B == 8 ? 0xff : (1 << B) - 1);
  const int64_t units = g / 16;
  __m512 y[R];
  float corr[R];
  for (int r = 0; r < R; ++r) y[r] = _mm512_setzero_ps(), corr[r] = 0.f;
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    __m512 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
    const int64_t fast_units = gi == n_groups - 1 ? units - 1 : units;
    for (int64_t u = 0; u < units; ++u) {
      const uint8_t* p = prow + (gi * units + u) * 2 * B;
      const __m512 c = u < fast_units ? codes16<B, false>(p, ctrl, mask) : codes16<B, true>(p, ctrl, mask);
      for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(c, _mm512_loadu_ps(x[r] + gi * g + u * 16), a[r]);
    }
    const float sc = static_cast<float>(srow[gi]);
    const float z = zrow ? static_cast<float>(zrow[gi]) : zconst;
    for (int r = 0; r < R; ++r) {
      y[r] = _mm512_fmadd_ps(_mm512_set1_ps(sc), a[r], y[r]);
      corr[r] += sc * z * xsum[r][gi];
    }
  }
  for (int r = 0; r < R; ++r) out[r][0] = _mm512_reduce_add_ps(y[r]) - corr[r];
}
#endif

// Rows (pairs of one expert, or input rows of a linear) that share one pass over a weight: the 16-lane path
// keeps 8 accumulators and 8 group partials in its 32 registers, the 8-lane path 4 of each in 16.
#ifdef MOE_EXPORT_AVX512
constexpr int kMaxRows = 8;
#else
constexpr int kMaxRows = 4;
#endif

// The 16-lane path needs groups of whole 16-code units.
bool use512(const Group& w) {
#ifdef MOE_EXPORT_AVX512
  return (w.K / w.G) % 16 == 0;
#else
  (void)w;
  return false;
#endif
}

// y[r][n] = W[slot][n, :] . x[r] for the R (<= kMaxRows) rows that share one expert.
template <int B>
void rows_gemv(const Group& w, int64_t slot, int R, const float* const* x, const float* const* xsum,
               float* const* y) {
  const int64_t N = w.N, G = w.G, g = w.K / w.G, row_bytes = w.K * B / 8;
  const uint8_t* base = w.packed + slot * N * row_bytes;
  const at::Half* sbase = w.scale + slot * N * G;
  const at::Half* zbase = w.zero ? w.zero + slot * N * G : nullptr;
  const float zc = w.zconst;
#ifdef MOE_EXPORT_AVX512
  if (use512(w)) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      int64_t n = n0;
      if (R == 1) {
        for (; n + 4 <= n1; n += 4)
          tile_512<B, 4>(base + n * row_bytes, row_bytes, sbase + n * G, zbase ? zbase + n * G : nullptr, G, zc, x[0],
                         xsum[0], G, g, y[0] + n);
      }
      for (; n < n1; ++n) {
        const uint8_t* prow = base + n * row_bytes;
        const at::Half* srow = sbase + n * G;
        const at::Half* zrow = zbase ? zbase + n * G : nullptr;
        float* outr[kMaxRows];
        for (int i = 0; i < R; ++i) outr[i] = y[i] + n;
        switch (R) {
          case 1: rows_512<B, 1>(prow, srow, zrow, zc, x, xsum, G, g, outr); break;
          case 2: rows_512<B, 2>(prow, srow, zrow, zc, x, xsum, G, g, outr); break;
          case 3: rows_512<B, 3>(prow, srow, zrow, zc, x, xsum, G, g, outr); break;
          case 4: rows_512<B, 4>(prow, srow, zrow, zc, x, xsum, G, g, outr); break;
          case 5: rows_512<B, 5>(prow, srow, zrow, zc, x, xsum, G, g, outr); break;
          case 6: rows_512<B, 6>(prow, srow, zrow, zc, x, xsum, G, g, outr); break;
          case 7: rows_512<B, 7>(prow, srow, zrow, zc, x, xsum, G, g, outr); break;
          default: rows_512<B, 8>(prow, srow, zrow, zc, x, xsum, G, g, outr); break;
        }
      }
    });
    return;
  }
#endif
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* prow = base + n * row_bytes;
      const at::Half* srow = sbase + n * G;
      const at::Half* zrow = zbase ? zbase + n * G : nullptr;
#ifdef MOE_EXPORT_AVX2
      float* outr[kMaxRows];
      for (int i = 0; i < R; ++i) outr[i] = y[i] + n;
      for (int r0 = 0; r0 < R; r0 += 4) {  // the 8-lane kernels take 4 rows at a time
        const int m = std::min(4, R - r0);
        switch (m) {
          case 1: *outr[r0] = row_dot_avx2<B>(prow, srow, zrow, zc, x[r0], xsum[r0], G, g); break;
          case 2: rows_dot_avx2<B, 2>(prow, srow, zrow, zc, x + r0, xsum + r0, outr + r0, G, g); break;
          case 3: rows_dot_avx2<B, 3>(prow, srow, zrow, zc, x + r0, xsum + r0, outr + r0, G, g); break;
          default: rows_dot_avx2<B, 4>(prow, srow, zrow, zc, x + r0, xsum + r0, outr + r0, G, g); break;
        }
      }
#else
      for (int i = 0; i < R; ++i) y[i][n] = row_dot_scalar<B>(prow, srow, zrow, zc, x[i], xsum[i], G, g);
#endif
    }
  });
}

void gemv(const Group& w, int64_t slot, int R, const float* const* x, const float* const* xsum, float* const* y) {
  switch (w.bits) {
    case 1: rows_gemv<1>(w, slot, R, x, xsum, y); break;
    case 2: rows_gemv<2>(w, slot, R, x, xsum, y); break;
    case 3: rows_gemv<3>(w, slot, R, x, xsum, y); break;
    case 4: rows_gemv<4>(w, slot, R, x, xsum, y); break;
    default: rows_gemv<8>(w, slot, R, x, xsum, y); break;
  }
}

// The AVX2 row kernels read widths <= 3 in place and need their inputs pre-scaled (see kInPlace).
bool needs_prescale(const Group& w) {
#ifdef MOE_EXPORT_AVX2
  return w.bits <= 3 && !use512(w);
#else
  (void)w;
  return false;
#endif
}

// Inputs of R rows for one width group: per-group sums of the unscaled rows (the zero term) and, where the
// row kernel wants it, the rows scaled lane-wise by 2^-(j*b). xs: R*K floats, sums: R*G floats.
void prepare_rows(const float* const* src, int R, const Group& w, float* xs, float* sums, const float** xp,
                  const float** sp) {
  const int64_t K = w.K, G = w.G, g = K / G;
  const bool pre = needs_prescale(w);
  float lane[8];
  for (int j = 0; j < 8; ++j) lane[j] = std::ldexp(1.0f, -j * w.bits);
  for (int r = 0; r < R; ++r) {
    const float* s = src[r];
    float* sr = sums + r * G;
    for (int64_t gi = 0; gi < G; ++gi) {
      // 8 interleaved partial sums, then a pairwise combine: a long sequential sum would carry more
      // rounding into the zero term (scale * zero * sum x), which cancels against the code dot product
      float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      const float* sg = s + gi * g;
      for (int64_t i = 0; i < g; i += 8)
        for (int j = 0; j < 8; ++j) part[j] += sg[i + j];
      sr[gi] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    }
    sp[r] = sr;
    if (pre) {
      float* d = xs + r * K;
      for (int64_t i = 0; i < K; ++i) d[i] = s[i] * lane[i & 7];
      xp[r] = d;
    } else {
      xp[r] = s;
    }
  }
}

// Reused per thread (the op runs on the calling thread; parallel_for only splits the rows of a mat-vec).
struct Scratch {
  std::vector<float> xs, sums, h, a, asums, as, y;
  std::vector<int64_t> order;
};

Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

}  // namespace

// x f32 [T, H]; topk_ids int64 [T, k]; topk_weights float [T, k]; expert_bits / slots: per expert, its width
// and its index inside that width's group; bits: the widths, one per group, in the order of the group lists.
// up_*: gate_up stacks [E_b, 2I, H*b/8] (gate rows first, then up rows); down_*: [E_b, H, I*b/8]. -> f32 [T, H]
at::Tensor moe_ffn(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                   std::vector<int64_t> expert_bits, std::vector<int64_t> slots, std::vector<int64_t> bits,
                   std::vector<at::Tensor> up_packed, std::vector<at::Tensor> up_scale,
                   std::vector<c10::optional<at::Tensor>> up_zero, std::vector<at::Tensor> down_packed,
                   std::vector<at::Tensor> down_scale, std::vector<c10::optional<at::Tensor>> down_zero) {
  const char* op = "moe_export::cpu_moe_ffn";
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
  std::vector<Group> up(n_groups), down(n_groups);
  int64_t I = -1;
  for (size_t gi = 0; gi < n_groups; ++gi) {
    TORCH_CHECK(up_packed[gi].dim() == 3 && down_packed[gi].dim() == 3, op,
                ": expert stacks must be 3-D [E_b, N, K*b/8]");
    up[gi] = make_group(up_packed[gi], up_scale[gi], up_zero[gi], bits[gi], H, "cpu_moe_ffn gate_up");
    TORCH_CHECK(up[gi].N % 2 == 0 && (I < 0 || up[gi].N == 2 * I), op, ": gate_up rows must be 2*I, the same for every width");
    I = up[gi].N / 2;
    down[gi] = make_group(down_packed[gi], down_scale[gi], down_zero[gi], bits[gi], I, "cpu_moe_ffn down");
    TORCH_CHECK(down[gi].N == H && down[gi].E == up[gi].E, op, ": down stack of width ", bits[gi], " is ",
                down_packed[gi].sizes(), ", expected [", up[gi].E, ", ", H, ", ", I * bits[gi] / 8, "]");
    for (size_t gj = 0; gj < gi; ++gj) TORCH_CHECK(bits[gj] != bits[gi], op, ": width ", bits[gi], " listed twice");
  }
  std::vector<int> group_of(E);
  for (int64_t e = 0; e < E; ++e) {
    int found = -1;
    for (size_t gi = 0; gi < n_groups; ++gi)
      if (bits[gi] == expert_bits[e]) found = int(gi);
    TORCH_CHECK(found >= 0, op, ": expert ", e, " has width ", expert_bits[e], ", which has no group");
    TORCH_CHECK(slots[e] >= 0 && slots[e] < up[found].E, op, ": expert ", e, " slot ", slots[e],
                " outside its group of ", up[found].E);
    group_of[e] = found;
  }
  auto xc = x.contiguous();
  auto ic = topk_ids.contiguous();
  auto wc = topk_weights.to(at::kFloat).contiguous();
  const int64_t k = ic.size(1), S = T * k;
  const int64_t* ids = ic.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(ids[s] >= 0 && ids[s] < E, op, ": topk_ids[", s / k, ", ", s % k, "] = ", ids[s],
                " outside [0, ", E, ")");
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();

  Scratch& sc = scratch();
  const int64_t Gmax = std::max<int64_t>(H, I) / 8;  // a group holds at least 8 values
  sc.xs.resize(kMaxRows * H);
  sc.sums.resize(kMaxRows * Gmax);
  sc.h.resize(kMaxRows * 2 * I);
  sc.a.resize(kMaxRows * I);
  sc.as.resize(kMaxRows * I);
  sc.asums.resize(kMaxRows * Gmax);
  sc.y.resize(S * H);
  // pairs grouped by expert, up to kMaxRows per batch: a batch reads each weight row once
  sc.order.clear();
  std::vector<bool> done(S, false);
  std::vector<std::pair<int64_t, int>> batches;  // (first index into order, size)
  for (int64_t s = 0; s < S; ++s) {
    if (done[s]) continue;
    int64_t start = int64_t(sc.order.size());
    int cnt = 0;
    for (int64_t t = s; t < S; ++t) {
      if (done[t] || ids[t] != ids[s]) continue;
      done[t] = true;
      sc.order.push_back(t);
      if (++cnt == kMaxRows) batches.emplace_back(start, cnt), start += cnt, cnt = 0;
    }
    if (cnt) batches.emplace_back(start, cnt);
  }
  const float* src[kMaxRows];
  const float* xin[kMaxRows];
  const float* xsum[kMaxRows];
  float* hout[kMaxRows];
  float* yout[kMaxRows];
  for (const auto& bt : batches) {
    const int R = bt.second;
    const int64_t* pairs = sc.order.data() + bt.first;
    const int64_t e = ids[pairs[0]];
    const Group& gu = up[group_of[e]];
    const Group& gd = down[group_of[e]];
    for (int r = 0; r < R; ++r) src[r] = xp + (pairs[r] / k) * H, hout[r] = sc.h.data() + r * 2 * I;
    prepare_rows(src, R, gu, sc.xs.data(), sc.sums.data(), xin, xsum);
    gemv(gu, slots[e], R, xin, xsum, hout);
    for (int r = 0; r < R; ++r) {
      const float* hr = hout[r];
      float* ar = sc.a.data() + r * I;
      for (int64_t i = 0; i < I; ++i) ar[i] = silu(hr[i]) * hr[I + i];
      src[r] = ar;
      yout[r] = sc.y.data() + pairs[r] * H;
    }
    prepare_rows(src, R, gd, sc.as.data(), sc.asums.data(), xin, xsum);
    gemv(gd, slots[e], R, xin, xsum, yout);
  }
  auto out = at::empty({T, H}, x.options());
  float* op_ = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    float* o = op_ + t * H;
    for (int64_t h = 0; h < H; ++h) o[h] = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const float wt = wp[t * k + j];
      const float* yr = sc.y.data() + (t * k + j) * H;
      for (int64_t h = 0; h < H; ++h) o[h] += yr[h] * wt;
    }
  }
  return out;
}

// x f32 [..., K]; packed u8 [N, K*b/8]; scale f16 [N, G]; zero f16 [N, G] or undefined -> f32 [..., N]
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                         c10::optional<at::Tensor> zero, int64_t bits) {
  const char* op = "moe_export::cpu_packed_linear";
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, op, ": x must be float32 [..., K], got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(packed.dim() == 2, op, ": packed must be uint8 [N, K*b/8], got ", packed.sizes());
  const int64_t K = x.size(-1);
  Group w = make_group(packed, scale, zero, bits, K, op);
  auto xc = x.contiguous();
  const int64_t R = K == 0 ? 0 : xc.numel() / K;
  auto sizes = x.sizes().vec();
  sizes.back() = w.N;
  auto out = at::empty(sizes, x.options());
  Scratch& sc = scratch();
  sc.xs.resize(kMaxRows * K);
  sc.sums.resize(kMaxRows * w.G);
  const float* xp = xc.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const float* src[kMaxRows];
  const float* xin[kMaxRows];
  const float* xsum[kMaxRows];
  float* yout[kMaxRows];
  for (int64_t r0 = 0; r0 < R; r0 += kMaxRows) {
    const int n = int(std::min<int64_t>(kMaxRows, R - r0));
    for (int i = 0; i < n; ++i) src[i] = xp + (r0 + i) * K, yout[i] = yp + (r0 + i) * w.N;
    prepare_rows(src, n, w, sc.xs.data(), sc.sums.data(), xin, xsum);
    gemv(w, 0, n, xin, xsum, yout);
  }
  return out;
}

#ifndef MOE_EXPORT_NO_OPS
namespace {
at::Tensor moe_ffn_op(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                      at::IntArrayRef expert_bits, at::IntArrayRef slots, at::IntArrayRef bits,
                      at::TensorList up_packed, at::TensorList up_scale,
                      const c10::List<c10::optional<at::Tensor>>& up_zero, at::TensorList down_packed,
                      at::TensorList down_scale, const c10::List<c10::optional<at::Tensor>>& down_zero) {
  auto opt = [](const c10::List<c10::optional<at::Tensor>>& l) {
    std::vector<c10::optional<at::Tensor>> v;
    v.reserve(l.size());
    for (size_t i = 0; i < l.size(); ++i) v.push_back(l.get(i));
    return v;
  };
  return moe_ffn(x, topk_ids, topk_weights, expert_bits.vec(), slots.vec(), bits.vec(), up_packed.vec(),
                 up_scale.vec(), opt(up_zero), down_packed.vec(), down_scale.vec(), opt(down_zero));
}

at::Tensor packed_linear_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& zero, int64_t bits) {
  return packed_linear(x, packed, scale, zero, bits);
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_export, m) {
  m.def("cpu_moe_ffn(Tensor x, Tensor topk_ids, Tensor topk_weights, int[] expert_bits, int[] slots, int[] bits, "
        "Tensor[] up_packed, Tensor[] up_scale, Tensor?[] up_zero, Tensor[] down_packed, Tensor[] down_scale, "
        "Tensor?[] down_zero) -> Tensor");
  m.def("cpu_packed_linear(Tensor x, Tensor packed, Tensor scale, Tensor? zero, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_export, CPU, m) {
  m.impl("cpu_moe_ffn", &moe_ffn_op);
  m.impl("cpu_packed_linear", &packed_linear_op);
}
#endif
