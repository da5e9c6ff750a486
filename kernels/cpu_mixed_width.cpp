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

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && !defined(MOE_EXPORT_NO_SIMD)
#include <immintrin.h>
#define MOE_EXPORT_AVX2 1
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
