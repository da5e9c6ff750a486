// moe_export kernel core: mixed-width packed weights times float activations on CPU, header-only C++17.
//
// Compiled by the torch extension (kernels/cpu_mixed_width.cpp: tensor checks, dispatcher registration,
// at::parallel_for) and by the ExecuTorch kernel library (the runtime's threadpool). No torch / ATen /
// ExecuTorch include: the host passes raw pointers and its parallel loop.
//
// Layout (docs/architecture.md): codes are an LSB-first bit stream per weight row, 8 codes per b bytes;
// scale and zero are IEEE fp16 bits per group of g consecutive codes; a symmetric grid stores no zero and
// uses symmetric_zero(b). Every width 1..8 is read at its own width (3 bits at 3 bits, no containers).
//
// Two arithmetics:
//   Accuracy::Exact  fp32 activations: y = sum_g s_g * (q_g . x_g) - s_g z_g sum(x_g), products and sums in
//                    float32 (the formula runtime.layout.dequantize defines, summed in another order).
//   Accuracy::Int8   activations quantized to int8 per block of the group size (one scale per block, computed
//                    once per activation row and shared by every weight it meets), integer dot products,
//                    y = sum_g (s_g sx_g) * (dot(q_g, xq_g) - z_g sum(xq_g)), reduced in one fixed float order
//                    that every path (scalar, AVX2, AVX-VNNI, AVX-512 VNNI) follows, so all paths agree bit
//                    for bit (see int8_combine).
//
// The vector paths are chosen at run time from the CPU's flags (per-function target attributes, one build);
// MOE_EXPORT_CPU_PATH=scalar|avx2|avx-vnni|avx512-vnni forces one (path_error() says when the CPU lacks it).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(MOE_EXPORT_CORE_SCALAR_ONLY)
#include <immintrin.h>
#define MOE_CORE_X86 1
// Per-function targets: the translation unit is compiled for the baseline ISA and each path's functions
// for their own, so one build runs on every x86-64 CPU.
#define MOE_T_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MOE_T_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define MOE_T_AVX512 \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))
#endif

namespace moe_export_core {

enum class Accuracy : int { Exact = 0, Int8 = 1 };

// One packed 2-D weight, or one width group of a fused expert weight.
struct PackedWeight {
  const uint8_t* codes = nullptr;   // [E, N, K*bits/8], LSB-first bit stream per row
  const uint16_t* scale = nullptr;  // IEEE fp16 bits, [E, N, K/group]
  const uint16_t* zero = nullptr;   // fp16 bits, same shape; nullptr = symmetric (zero = symmetric_zero(bits))
  int32_t bits = 0;                 // 1..8
  int64_t experts = 1, rows = 0, cols = 0, group = 0;  // E (1 for a 2-D weight), N, K, group size (== K per row)
  int64_t groups() const { return cols / group; }
  int64_t row_bytes() const { return cols * bits / 8; }
};

// 1-bit symmetric is sign binarisation (levels +-scale/2); wider grids are signed ints offset by 2^(b-1).
inline float symmetric_zero(int bits) { return bits == 1 ? 0.5f : float(1 << (bits - 1)); }

// IEEE half -> float, exact for every value (normals, subnormals, inf, nan).
inline float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    bits = sign | (uint32_t(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Whether the shapes can run: widths 1..8, groups of whole 8-code units.
inline bool valid_shape(const PackedWeight& w) {
  return w.bits >= 1 && w.bits <= 8 && w.group > 0 && w.cols % w.group == 0 && w.group % 8 == 0;
}

// ------------------------------------------------------------------------------------------ run-time path

enum class Path : int { Scalar = 0, Avx2 = 1, AvxVnni = 2, Avx512Vnni = 3 };

namespace detail {

inline bool cpu_has(Path p) {
#ifdef MOE_CORE_X86
  __builtin_cpu_init();
  switch (p) {
    case Path::Scalar: return true;
    case Path::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Path::AvxVnni:
      return cpu_has(Path::Avx2) && __builtin_cpu_supports("avxvnni");
    case Path::Avx512Vnni:
      return cpu_has(Path::Avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
             __builtin_cpu_supports("avx512vbmi");
  }
  return false;
#else
  return p == Path::Scalar;
#endif
}

struct PathChoice {
  Path path = Path::Scalar;
  const char* error = nullptr;  // a forced path the CPU lacks (or an unknown name)
};

inline PathChoice choose_path() {
  PathChoice c;
  const char* env = std::getenv("MOE_EXPORT_CPU_PATH");
  if (env && *env) {
    const std::pair<const char*, Path> names[] = {
        {"scalar", Path::Scalar}, {"avx2", Path::Avx2}, {"avx-vnni", Path::AvxVnni}, {"avx512-vnni", Path::Avx512Vnni}};
    for (const auto& n : names)
      if (std::strcmp(env, n.first) == 0) {
        c.path = n.second;
        if (!cpu_has(n.second)) c.error = "MOE_EXPORT_CPU_PATH names a path this CPU (or this build) lacks";
        return c;
      }
    c.error = "MOE_EXPORT_CPU_PATH must be one of scalar, avx2, avx-vnni, avx512-vnni";
    return c;
  }
  for (Path p : {Path::Avx512Vnni, Path::AvxVnni, Path::Avx2})
    if (cpu_has(p)) return c.path = p, c;
  return c;
}

inline const PathChoice& path_choice() {
  static const PathChoice c = choose_path();  // read once per process
  return c;
}

}  // namespace detail

namespace detail {
inline std::atomic<int>& path_override() {
  static std::atomic<int> p{-1};  // set_path(); -1: the environment's choice
  return p;
}
}  // namespace detail

// The path the kernels run: set_path()'s, else MOE_EXPORT_CPU_PATH's, else the best the CPU has.
inline Path active_path() {
  const int o = detail::path_override().load(std::memory_order_relaxed);
  if (o >= 0) return static_cast<Path>(o);
  return detail::path_choice().error ? Path::Scalar : detail::path_choice().path;
}

// Switch the path for the rest of the process (tests compare paths in one process): nullptr on success, else
// why not (an unknown name, or a path this CPU lacks). "" restores the environment's choice.
inline const char* set_path(const char* name) {
  if (!name || !*name) return detail::path_override().store(-1), nullptr;
  const std::pair<const char*, Path> names[] = {
      {"scalar", Path::Scalar}, {"avx2", Path::Avx2}, {"avx-vnni", Path::AvxVnni}, {"avx512-vnni", Path::Avx512Vnni}};
  for (const auto& n : names)
    if (std::strcmp(name, n.first) == 0) {
      if (!detail::cpu_has(n.second)) return "this CPU (or this build) lacks that path";
      detail::path_override().store(int(n.second));
      return nullptr;
    }
  return "the path must be one of scalar, avx2, avx-vnni, avx512-vnni";
}

// nullptr, or why MOE_EXPORT_CPU_PATH cannot be honoured: the host raises it before calling a kernel.
inline const char* path_error() {
  return detail::path_override().load(std::memory_order_relaxed) >= 0 ? nullptr : detail::path_choice().error;
}

inline const char* path_name(Path p) {
  switch (p) {
    case Path::Avx512Vnni: return "avx512-vnni";
    case Path::AvxVnni: return "avx-vnni";
    case Path::Avx2: return "avx2";
    default: return "scalar";
  }
}

// "avx512-vnni" | "avx-vnni" | "avx2" | "scalar": what run-time dispatch picked.
inline const char* kernel_path() { return path_name(active_path()); }

// Whether this build has any vector path compiled in.
inline bool has_simd() {
#ifdef MOE_CORE_X86
  return true;
#else
  return false;
#endif
}

namespace detail {

// ------------------------------------------------------------------------------------------ exact: scalar

// 8 codes of B bits as one little-endian word (B bytes); code j sits at bits j*B .. j*B+B-1.
template <int B>
inline uint64_t load_unit(const uint8_t* p) {
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
  } else if constexpr (B == 4) {
    uint32_t w;
    std::memcpy(&w, p, 4);
    return w;
  } else {
    uint64_t w = 0;
    std::memcpy(&w, p, B);
    return w;
  }
}

template <int B>
inline float row_dot_scalar(const uint8_t* prow, const uint16_t* srow, const uint16_t* zrow, float zconst,
                            const float* x, const float* xsum, int64_t n_groups, int64_t g) {
  float y = 0.f;
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const uint8_t* p = prow + gi * (g * B / 8);
    const float* xg = x + gi * g;
    float acc = 0.f;
    if constexpr (B == 8) {
      for (int64_t k = 0; k < g; ++k) acc += float(p[k]) * xg[k];
    } else {
      constexpr uint64_t mask = (1u << B) - 1u;
      for (int64_t u = 0; u < g / 8; ++u) {
        const uint64_t w = load_unit<B>(p + u * B);
        for (int j = 0; j < 8; ++j) acc += float((w >> (j * B)) & mask) * xg[u * 8 + j];
      }
    }
    const float s = fp16_to_fp32(srow[gi]);
    const float z = zrow ? fp16_to_fp32(zrow[gi]) : zconst;
    y += s * (acc - z * xsum[gi]);
  }
  return y;
}

#ifdef MOE_CORE_X86
// ------------------------------------------------------------------------------------------ exact: 8 lanes

MOE_T_AVX2 inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// Widths whose 8 codes fit in 24 bits skip the shift: lane j keeps its code in place (w & (mask << j*B)),
// i.e. q * 2^(j*B), exact in float; the activations were pre-scaled by 2^-(j*B) (``prepare_rows``), so the
// product is unchanged and only the summation differs from the reference.
template <int B>
constexpr bool kInPlace = B <= 3;

// 8 codes as 8 floats. B <= 4: one 32-bit word, lane j shifted by j*B; B = 5..7: codes 0-3 from the low 32
// bits, 4-7 from the word shifted by 4*B (both halves fit 32 bits). FAST reads past the unit (3 bits: one
// byte, 5-7 bits: 8-B bytes): callers keep it inside the row.
template <int B, bool FAST>
MOE_T_AVX2 inline __m256 codes8(const uint8_t* p, __m256i shifts, __m256i mask) {
  if constexpr (B == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  } else if constexpr (B > 4) {
    uint64_t w;
    if constexpr (FAST) {
      std::memcpy(&w, p, 8);
    } else {
      w = load_unit<B>(p);
    }
    const int lo = static_cast<int>(uint32_t(w)), hi = static_cast<int>(uint32_t(w >> (4 * B)));
    const __m256i v = _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, shifts), mask));
  } else {
    uint32_t u;
    if constexpr (FAST && B == 3) {
      std::memcpy(&u, p, 4);
    } else {
      u = uint32_t(load_unit<B>(p));
    }
    const __m256i w = _mm256_set1_epi32(static_cast<int>(u));
    if constexpr (kInPlace<B>) return _mm256_cvtepi32_ps(_mm256_and_si256(w, mask));
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, shifts), mask));
  }
}

template <int B>
MOE_T_AVX2 inline __m256i shifts8() {
  constexpr int SH = B == 8 ? 0 : B;
  if constexpr (B > 4 && B < 8) return _mm256_setr_epi32(0, SH, 2 * SH, 3 * SH, 0, SH, 2 * SH, 3 * SH);
  return _mm256_setr_epi32(0, SH, 2 * SH, 3 * SH, 4 * SH, 5 * SH, 6 * SH, 7 * SH);
}

template <int B>
MOE_T_AVX2 inline __m256i mask8() {
  constexpr int SH = B == 8 ? 0 : B;
  constexpr int M = B == 8 ? 0xff : (1 << B) - 1;
  if constexpr (kInPlace<B>)
    return _mm256_setr_epi32(M, M << SH, M << 2 * SH, M << 3 * SH, M << 4 * SH, M << 5 * SH, M << 6 * SH, M << 7 * SH);
  return _mm256_set1_epi32(M);
}

template <int B>
MOE_T_AVX2 inline float row_dot_avx2(const uint8_t* prow, const uint16_t* srow, const uint16_t* zrow, float zconst,
                                     const float* x, const float* xsum, int64_t n_groups, int64_t g) {
  const __m256i shifts = shifts8<B>(), mask = mask8<B>();
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
    const float s = fp16_to_fp32(srow[gi]);
    const float z = zrow ? fp16_to_fp32(zrow[gi]) : zconst;
    y = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_add_ps(a0, a1), y);
    corr += s * z * xsum[gi];
  }
  return hsum(y) - corr;
}

// R pairs routed to the same expert (decode with T > 1): unpack each code vector once, FMA it with R inputs.
template <int B, int R>
MOE_T_AVX2 inline void rows_dot_avx2(const uint8_t* prow, const uint16_t* srow, const uint16_t* zrow, float zconst,
                                     const float* const* x, const float* const* xsum, float* const* out,
                                     int64_t n_groups, int64_t g) {
  const __m256i shifts = shifts8<B>(), mask = mask8<B>();
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
    const float sc = fp16_to_fp32(srow[gi]);
    const float z = zrow ? fp16_to_fp32(zrow[gi]) : zconst;
    for (int r = 0; r < R; ++r) {
      y[r] = _mm256_fmadd_ps(_mm256_set1_ps(sc), a[r], y[r]);
      corr[r] += sc * z * xsum[r][gi];
    }
  }
  for (int r = 0; r < R; ++r) *out[r] = hsum(y[r]) - corr[r];
}

// Up to 4 input rows against one weight row, 8-lane kernels.
template <int B>
MOE_T_AVX2 inline void row_block_avx2(const uint8_t* prow, const uint16_t* srow, const uint16_t* zrow, float zc,
                                      int R, const float* const* x, const float* const* xsum, float* const* out,
                                      int64_t G, int64_t g) {
  for (int r0 = 0; r0 < R; r0 += 4) {
    switch (std::min(4, R - r0)) {
      case 1: *out[r0] = row_dot_avx2<B>(prow, srow, zrow, zc, x[r0], xsum[r0], G, g); break;
      case 2: rows_dot_avx2<B, 2>(prow, srow, zrow, zc, x + r0, xsum + r0, out + r0, G, g); break;
      case 3: rows_dot_avx2<B, 3>(prow, srow, zrow, zc, x + r0, xsum + r0, out + r0, G, g); break;
      default: rows_dot_avx2<B, 4>(prow, srow, zrow, zc, x + r0, xsum + r0, out + r0, G, g); break;
    }
  }
}

// ------------------------------------------------------------------------------------------ exact: 16 lanes

// 16 codes of B bits (2B bytes) as 16 floats. Dword lane j takes the byte that starts at bit j*B of a 64-bit
// word (vpmultishiftqb) and masks it to B bits, so every width costs the same few instructions and nothing is
// pre-scaled. B <= 4: the 16 codes are one word; B = 5..7: two 8-code words, one per 256-bit half; B = 8: 16
// bytes. Units are read past their end (1, 3 bits: 2 bytes; 5-7 bits: 8-B bytes) unless SAFE (a row's last
// unit), so the extra bytes stay inside the row.
template <int B, bool SAFE>
MOE_T_AVX512 inline __m512 codes16(const uint8_t* p, __m512i ctrl, __m512i mask) {
  typedef long long u64_unaligned __attribute__((may_alias, aligned(1)));
  typedef int u32_unaligned __attribute__((may_alias, aligned(1)));
  if constexpr (B == 8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  } else {
    // Broadcast straight from memory (a load-port uop; a broadcast from a register costs a shuffle-port
    // uop, the port vpmultishiftqb needs). Only the 2B bytes of the unit are ever used.
    __m512i v;
    if constexpr (B > 4) {
      uint64_t w1;
      if constexpr (SAFE) {
        w1 = load_unit<B>(p + B);
      } else {
        std::memcpy(&w1, p + B, 8);
      }
      const __m256i lo = _mm256_set1_epi64x(*reinterpret_cast<const u64_unaligned*>(p));
      v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), _mm256_set1_epi64x(static_cast<long long>(w1)), 1);
    } else if constexpr (B == 4 || (B == 3 && !SAFE)) {
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
MOE_T_AVX512 inline __m512i multishift_ctrl() {
  alignas(64) uint8_t c[64];
  for (int j = 0; j < 16; ++j)
    for (int i = 0; i < 4; ++i) c[4 * j + i] = uint8_t((((B > 4 ? j % 8 : j) * B) & 63) + 8 * i);
  return _mm512_load_si512(c);
}

// NR (<= 4) consecutive weight rows against one input row: NR independent FMA chains share each x load.
template <int B, int NR>
MOE_T_AVX512 inline void tile_512(const uint8_t* prow, int64_t row_bytes, const uint16_t* srow, const uint16_t* zrow,
                                  int64_t G, float zconst, const float* x, const float* xsum, int64_t n_groups,
                                  int64_t g, float* out) {
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
      const float sc = fp16_to_fp32(srow[r * G + gi]);
      const float z = zrow ? fp16_to_fp32(zrow[r * G + gi]) : zconst;
      y[r] = _mm512_fmadd_ps(_mm512_set1_ps(sc), a[r], y[r]);
      corr[r] += sc * z * xsum[gi];
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(y[r]) - corr[r];
}

// One weight row against R (<= 8) input rows (pairs of one expert): the codes are cut once for all R.
template <int B, int R>
MOE_T_AVX512 inline void rows_512(const uint8_t* prow, const uint16_t* srow, const uint16_t* zrow, float zconst,
                                  const float* const* x, const float* const* xsum, int64_t n_groups, int64_t g,
                                  float* const* out) {
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
    const float sc = fp16_to_fp32(srow[gi]);
    const float z = zrow ? fp16_to_fp32(zrow[gi]) : zconst;
    for (int r = 0; r < R; ++r) {
      y[r] = _mm512_fmadd_ps(_mm512_set1_ps(sc), a[r], y[r]);
      corr[r] += sc * z * xsum[r][gi];
    }
  }
  for (int r = 0; r < R; ++r) out[r][0] = _mm512_reduce_add_ps(y[r]) - corr[r];
}

// Output rows [n0, n1) of one expert's weight against R (<= 8) input rows, 16-lane kernels.
template <int B>
MOE_T_AVX512 inline void rows_range_512(const uint8_t* base, const uint16_t* sbase, const uint16_t* zbase, float zc,
                                        int64_t row_bytes, int64_t G, int64_t g, int R, const float* const* x,
                                        const float* const* xsum, float* const* y, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (R == 1) {
    for (; n + 4 <= n1; n += 4)
      tile_512<B, 4>(base + n * row_bytes, row_bytes, sbase + n * G, zbase ? zbase + n * G : nullptr, G, zc, x[0],
                     xsum[0], G, g, y[0] + n);
  }
  for (; n < n1; ++n) {
    const uint8_t* prow = base + n * row_bytes;
    const uint16_t* srow = sbase + n * G;
    const uint16_t* zrow = zbase ? zbase + n * G : nullptr;
    float* outr[8];
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
}

template <int B>
MOE_T_AVX2 inline void rows_range_avx2(const uint8_t* base, const uint16_t* sbase, const uint16_t* zbase, float zc,
                                       int64_t row_bytes, int64_t G, int64_t g, int R, const float* const* x,
                                       const float* const* xsum, float* const* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    float* outr[8];
    for (int i = 0; i < R; ++i) outr[i] = y[i] + n;
    row_block_avx2<B>(base + n * row_bytes, sbase + n * G, zbase ? zbase + n * G : nullptr, zc, R, x, xsum, outr, G, g);
  }
}

// out[h] = sum_j y_j[h] * w_j, in order j = 0..k-1 (one FMA per term).
MOE_T_AVX2 inline void weighted_sum_fma(float* o, const float* const* y, const float* w, int64_t k, int64_t H) {
  for (int64_t h = 0; h < H; ++h) {
    float v = 0.f;
    for (int64_t j = 0; j < k; ++j) v = std::fma(y[j][h], w[j], v);
    o[h] = v;
  }
}
#endif  // MOE_CORE_X86

template <int B>
inline void rows_range_scalar(const uint8_t* base, const uint16_t* sbase, const uint16_t* zbase, float zc,
                              int64_t row_bytes, int64_t G, int64_t g, int R, const float* const* x,
                              const float* const* xsum, float* const* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int i = 0; i < R; ++i)
      y[i][n] = row_dot_scalar<B>(base + n * row_bytes, sbase + n * G, zbase ? zbase + n * G : nullptr, zc, x[i],
                                  xsum[i], G, g);
}

// Rows (pairs of one expert, or input rows of a linear) that share one pass over a weight: the 16-lane path
// keeps 8 accumulators and 8 group partials in its 32 registers, the 8-lane path 4 of each in 16.
constexpr int kMaxRows = 8;
// Activation rows per pass of the int8 kernels (prefill: the codes of a weight row are cut once per batch).
constexpr int kMaxInt8Rows = 64;
// Output rows per task of the host's parallel loop: decode's projections (>= 1024 rows) split across threads.
constexpr int64_t kRowBlock = 16;

// The exact kernel family a weight runs with: 16 lanes need groups of whole 16-code units.
enum class ExactKind { Scalar, Lanes8, Lanes16 };

inline ExactKind exact_kind(const PackedWeight& w) {
  const Path p = active_path();
  if (p == Path::Scalar) return ExactKind::Scalar;
  if (p == Path::Avx512Vnni && w.group % 16 == 0) return ExactKind::Lanes16;
  return ExactKind::Lanes8;
}


// The 8-lane kernels read widths <= 3 in place and need their inputs pre-scaled (kInPlace).
inline bool needs_prescale(const PackedWeight& w) { return exact_kind(w) == ExactKind::Lanes8 && w.bits <= 3; }

template <class Par, class Fn>
inline void for_row_blocks(int64_t N, Par&& par, Fn&& fn) {
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  par(int64_t(0), blocks, [&](int64_t b0, int64_t b1) { fn(b0 * kRowBlock, std::min(N, b1 * kRowBlock)); });
}

// y[r][n] = W[slot][n, :] . x[r] for R (<= kMaxRows) input rows, every output row, exact arithmetic.
template <int B, class Par>
inline void exact_rows_gemv(const PackedWeight& w, int64_t slot, int R, const float* const* x,
                            const float* const* xsum, float* const* y, Par&& par) {
  const int64_t N = w.rows, G = w.groups(), g = w.group, row_bytes = w.row_bytes();
  const uint8_t* base = w.codes + slot * N * row_bytes;
  const uint16_t* sbase = w.scale + slot * N * G;
  const uint16_t* zbase = w.zero ? w.zero + slot * N * G : nullptr;
  const float zc = symmetric_zero(B);
  switch (exact_kind(w)) {
#ifdef MOE_CORE_X86
    case ExactKind::Lanes16:
      for_row_blocks(N, par, [&](int64_t n0, int64_t n1) {
        rows_range_512<B>(base, sbase, zbase, zc, row_bytes, G, g, R, x, xsum, y, n0, n1);
      });
      return;
    case ExactKind::Lanes8:
      for_row_blocks(N, par, [&](int64_t n0, int64_t n1) {
        rows_range_avx2<B>(base, sbase, zbase, zc, row_bytes, G, g, R, x, xsum, y, n0, n1);
      });
      return;
#endif
    default:
      for_row_blocks(N, par, [&](int64_t n0, int64_t n1) {
        rows_range_scalar<B>(base, sbase, zbase, zc, row_bytes, G, g, R, x, xsum, y, n0, n1);
      });
  }
}

template <class Par>
inline void exact_gemv(const PackedWeight& w, int64_t slot, int R, const float* const* x, const float* const* xsum,
                       float* const* y, Par&& par) {
  switch (w.bits) {
    case 1: exact_rows_gemv<1>(w, slot, R, x, xsum, y, par); break;
    case 2: exact_rows_gemv<2>(w, slot, R, x, xsum, y, par); break;
    case 3: exact_rows_gemv<3>(w, slot, R, x, xsum, y, par); break;
    case 4: exact_rows_gemv<4>(w, slot, R, x, xsum, y, par); break;
    case 5: exact_rows_gemv<5>(w, slot, R, x, xsum, y, par); break;
    case 6: exact_rows_gemv<6>(w, slot, R, x, xsum, y, par); break;
    case 7: exact_rows_gemv<7>(w, slot, R, x, xsum, y, par); break;
    default: exact_rows_gemv<8>(w, slot, R, x, xsum, y, par); break;
  }
}

// Inputs of R rows for one weight: per-group sums of the unscaled rows (the zero term) and, where the row
// kernel wants it, the rows scaled lane-wise by 2^-(j*b). xs: R*K floats, sums: R*G floats.
inline void prepare_rows(const float* const* src, int R, const PackedWeight& w, float* xs, float* sums,
                         const float** xp, const float** sp) {
  const int64_t K = w.cols, G = w.groups(), g = w.group;
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

// ------------------------------------------------------------------------------------------ int8 activations

// One activation row quantized per block of g values: q[k] = round_half_even(x[k] * 127 / amax_b),
// scale_b = amax_b / 127 (0 for an all-zero block), qsum_b = sum of the block's q (exact in float).
// Buffers are padded: q to a multiple of 64 codes (zeros), scale/qsum to a multiple of 16 blocks (zeros),
// so the vector kernels read whole vectors without tails.
struct QuantRow {
  const int8_t* q = nullptr;    // [K padded]
  const int16_t* q16 = nullptr; // the same values widened (the 8-lane kernels' vpmaddwd operand)
  const float* scale = nullptr; // [G padded]
  const float* qsum = nullptr;  // [G padded]
};

inline int64_t pad_to(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Storage for R quantized rows of K values in blocks of g.
struct QuantBuf {
  std::vector<int8_t> q;
  std::vector<int16_t> q16;
  std::vector<float> scale, qsum;
  int64_t kp = 0, gp = 0;
  void resize(int R, int64_t K, int64_t g) {
    kp = pad_to(K, 64);
    gp = pad_to(K / g, 16);
    q.assign(size_t(R) * kp, 0);
    q16.assign(size_t(R) * kp, 0);
    scale.assign(size_t(R) * gp, 0.f);
    qsum.assign(size_t(R) * gp, 0.f);
  }
};

inline void quantize_row(const float* x, int64_t K, int64_t g, int8_t* q, int16_t* q16, float* scale, float* qsum) {
  for (int64_t b = 0; b < K / g; ++b) {
    const float* xb = x + b * g;
    float amax = 0.f;
    for (int64_t i = 0; i < g; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t s = 0;
    for (int64_t i = 0; i < g; ++i) {
      const int v = int(std::nearbyint(xb[i] * inv));  // |v| <= 127: x * 127/amax rounds to at most 127
      q[b * g + i] = int8_t(v);
      q16[b * g + i] = int16_t(v);
      s += v;
    }
    scale[b] = amax / 127.f;
    qsum[b] = float(s);
  }
}

#ifdef MOE_CORE_X86
// quantize_row with 8 lanes: the same max, product and round-half-even (vroundps), so the same codes.
MOE_T_AVX2 inline void quantize_row_avx2(const float* x, int64_t K, int64_t g, int8_t* q, int16_t* q16, float* scale,
                                         float* qsum) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t b = 0; b < K / g; ++b) {
    const float* xb = x + b * g;
    __m256 m = _mm256_setzero_ps();
    for (int64_t i = 0; i < g; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(xb + i), absmask));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t i = 0; i < g; i += 8) {
      const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + i), vinv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256i vi = _mm256_cvtps_epi32(r);
      sum = _mm256_add_epi32(sum, vi);
      const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(vi), _mm256_extracti128_si256(vi, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q16 + b * g + i), p16);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + b * g + i), _mm_packs_epi16(p16, p16));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    scale[b] = amax / 127.f;
    qsum[b] = float(_mm_cvtsi128_si32(s4));
  }
}
#endif

inline QuantRow quantize_into(QuantBuf& buf, int r, const float* x, int64_t K, int64_t g) {
  int8_t* q = buf.q.data() + r * buf.kp;
  int16_t* q16 = buf.q16.data() + r * buf.kp;
  float* sc = buf.scale.data() + r * buf.gp;
  float* qs = buf.qsum.data() + r * buf.gp;
#ifdef MOE_CORE_X86
  if (active_path() != Path::Scalar) {
    quantize_row_avx2(x, K, g, q, q16, sc, qs);
    return QuantRow{q, q16, sc, qs};
  }
#endif
  quantize_row(x, K, g, q, q16, sc, qs);
  return QuantRow{q, q16, sc, qs};
}

// The float reduction every int8 path follows (so scalar, AVX2, AVX-VNNI and AVX-512 VNNI agree bit for bit),
// for one weight row and one quantized activation row. Group gi's exact integer products q_c * xq_c go to 16
// integer lanes: code c of the group (counted from the group's start) to lane (c mod 64) / 4, the dword quads
// of a 64-code vpdpbusd. Then, groups in increasing order:
//   d = s_w * s_x;   acc[l] = fma(d, float(p[l]), acc[l]) for all 16 lanes;   zacc[gi % 16] = fma(d, z * qsum, ..)
// and y = fold(acc) - fold(zacc), fold = the halving + [i + 8], + [i + 4], + [i + 2], + [i + 1]. Each group
// costs one convert and one FMA per lane vector: no horizontal sum until the row's end (an earlier order reduced
// every group to one integer first, a permute tree that cost as much as the dot products). The zero term is kept
// apart: d * z * qsum per group, 16 groups a vector.
inline float fold16_scalar(float* a) {
  for (int h = 8; h >= 1; h /= 2)
    for (int i = 0; i < h; ++i) a[i] = a[i] + a[i + h];
  return a[0];
}

template <int B>
inline float int8_row_scalar(const uint8_t* prow, const uint16_t* srow, const uint16_t* zrow, float zc,
                             const QuantRow& xq, int64_t G, int64_t g) {
  constexpr uint64_t mask = B == 8 ? 0xffu : (1u << B) - 1u;
  float acc[16] = {0.f}, zacc[16] = {0.f};
  for (int64_t gi = 0; gi < G; ++gi) {
    const uint8_t* pg = prow + gi * (g * B / 8);
    const int8_t* xg = xq.q + gi * g;
    int32_t p[16] = {0};
    for (int64_t u = 0; u < g / 8; ++u) {
      const uint64_t w = load_unit<B>(pg + u * B);
      for (int j = 0; j < 8; ++j) {
        const int64_t c = u * 8 + j;
        p[(c & 63) >> 2] += int32_t((w >> (j * B)) & mask) * int32_t(xg[c]);
      }
    }
    const float d = fp16_to_fp32(srow[gi]) * xq.scale[gi];
    for (int l = 0; l < 16; ++l) acc[l] = std::fma(d, float(p[l]), acc[l]);
    const float z = zrow ? fp16_to_fp32(zrow[gi]) : zc;
    zacc[gi & 15] = std::fma(d, z * xq.qsum[gi], zacc[gi & 15]);
  }
  return fold16_scalar(acc) - fold16_scalar(zacc);
}

#ifdef MOE_CORE_X86
// ---------------------------------------------------------------- int8, AVX-512 VNNI: 64 codes per vector

// 64 codes of B bits (8B bytes, LSB-first) as 64 bytes: vpermb spreads the 8 units of B bytes into the 8
// qwords, vpmultishiftqb moves the byte starting at bit j*B of each qword into its byte j, one AND keeps B
// bits. The load is masked to the unit's bytes (lm): nothing past the group is read, and missing units are 0.
template <int B>
struct Codes64Tables {
  uint8_t perm[64], ctrl[64];
  constexpr Codes64Tables() : perm(), ctrl() {
    for (int i = 0; i < 8; ++i)
      for (int k = 0; k < 8; ++k) perm[8 * i + k] = uint8_t(B * i + k), ctrl[8 * i + k] = uint8_t(k * B);
  }
};

template <int B>
MOE_T_AVX512 inline __m512i codes64(const uint8_t* p, __mmask64 lm, __m512i perm, __m512i ctrl, __m512i mask) {
  const __m512i v = _mm512_maskz_loadu_epi8(lm, p);
  if constexpr (B == 8) {
    return v;
  } else {
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, _mm512_permutexvar_epi8(perm, v)), mask);
  }
}

// The canonical fold of 16 float lanes: + [i + 8], + [i + 4], + [i + 2], + [i + 1].
MOE_T_AVX512 inline float fold16(__m512 acc) {
  const __m256 lo = _mm512_castps512_ps256(acc);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
  const __m256 s8 = _mm256_add_ps(lo, hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// fold16 of 16 vectors at once: every lane pair is added in fold16's order (so each sum is bit for bit
// fold16's), with the 16 rows side by side in the lanes instead of one horizontal tree per row; decode of a
// K = 1024 row spent about a sixth of its time in its two trees. Row r ends in lane 4 (r % 4) + r / 4.
MOE_T_AVX512 inline __m512 fold16x16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int k = 0; k < 8; ++k)  // rows 2k, 2k+1: [i] + [i + 8]
    b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int k = 0; k < 4; ++k)  // four rows a vector: + [i + 4]
    c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int k = 0; k < 2; ++k) {  // eight rows a vector: + [i + 2]
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(c[2 * k]), _mm512_castps_pd(c[2 * k + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(c[2 * k]), _mm512_castps_pd(c[2 * k + 1]));
    d[k] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),  // + [i + 1]
                       _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

inline __mmask64 low_bits64(int64_t n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; }

// NR weight rows (`stride` bytes apart) against one quantized row: out[r] for r < NR. The NR rows share each
// activation load and the 16-group blocks of scales. UNPACKED: the rows are already cut into one byte per code
// (unpack_row_512; prefill cuts a row once for all the activation rows it meets).
// Widths 2 and 4 hold a lane's four codes in one byte / one 16-bit word of the stream, so a zero-extending load
// (vpmovzxbd / vpmovzxwd) puts them in their dword without the byte permute; vpmultishiftqb cuts them as above.
// Same bytes out as codes64; decode from DRAM 1.26-1.45x (2-bit 1024 x 2816) and 1.2x (4-bit) per code on Zen 4.
// (An expanding load for the other widths, vpexpandb in place of load + vpermb, was 0.65-0.9x there.)
template <int B>
MOE_T_AVX512 inline __m512i aligned_codes64(const uint8_t* p, __m512i mask) {
  static_assert(B == 2 || B == 4, "a lane's codes fill one byte (2-bit) or one word (4-bit)");
  if constexpr (B == 2) {
    const __m512i ctrl = _mm512_set1_epi64(0x2624222006040200LL);  // bits 0,2,4,6 of each dword
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, v), mask);
  } else {
    const __m512i ctrl = _mm512_set1_epi64(0x2c2824200c080400LL);  // bits 0,4,8,12 of each dword
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, v), mask);
  }
}

// Whole vector u of a group: packed codes cut by codes64 (aligned_codes64 for 2 and 4 bits), or a row already
// cut into bytes.
template <int B, bool UNPACKED>
MOE_T_AVX512 inline __m512i whole_codes64(const uint8_t* pr, int64_t u, __mmask64 cm, __m512i perm, __m512i ctrl,
                                          __m512i mask) {
  if constexpr (UNPACKED)
    return _mm512_loadu_si512(pr + u * 64);
  else if constexpr (B == 2 || B == 4)
    return aligned_codes64<B>(pr + u * 8 * B, mask);
  else
    return codes64<B>(pr + u * 8 * B, cm, perm, ctrl, mask);
}

// GC: the group size when known at compile time (0: g at run time). With `acc_out` given, the rows' float lane
// sums and zero terms are left there unfolded (acc_out[r], acc_out[NR + r]) for fold16x16.
template <int B, int NR, bool UNPACKED, int GC>
MOE_T_AVX512 inline void int8_rows_512(const uint8_t* prow, int64_t stride, const uint16_t* srow,
                                       const uint16_t* zrow, float zc, const QuantRow& xq, int64_t G, int64_t g,
                                       float* out, __m512* acc_out = nullptr) {
  static constexpr Codes64Tables<B> tab{};
  const __m512i perm = _mm512_loadu_si512(tab.perm), ctrl = _mm512_loadu_si512(tab.ctrl);
  const __m512i perm_hi = _mm512_add_epi8(perm, _mm512_set1_epi8(char(8 * B)));  // units 8..15 of a load
  const __m512i mask = _mm512_set1_epi8(char(B == 8 ? 0xff : (1 << B) - 1));
  const int64_t gg = GC ? GC : g;
  const int64_t gb = UNPACKED ? gg : gg * B / 8;  // bytes per group
  const int64_t nfull = gg / 64, tail = gg % 64;  // whole 64-code vectors of a group, codes of its partial one
  // A group of at most two vectors is one vpdpbusd chain (the even / odd split below is for long groups; one
  // chain saves an add a group). Two 3-bit vectors are 48 bytes: one load, cut by two permutes.
  constexpr bool ONE_CHAIN = GC != 0 && GC <= 128;
  const __mmask64 full_cm = low_bits64(8 * B), tail_xm = low_bits64(tail), tail_cm = low_bits64(tail * B / 8);
  __m512 acc[NR], zacc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps(), zacc[r] = _mm512_setzero_ps();
  alignas(64) float dl[NR][16];
  for (int64_t g0 = 0; g0 < G; g0 += 16) {
    const int64_t ng = std::min<int64_t>(16, G - g0);
    const __mmask16 m = ng == 16 ? __mmask16(0xffff) : __mmask16((1u << ng) - 1);
    const __m512 xs = _mm512_maskz_loadu_ps(m, xq.scale + g0);
    const __m512 qs = _mm512_maskz_loadu_ps(m, xq.qsum + g0);
    for (int r = 0; r < NR; ++r) {
      const __m512 d = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, srow + r * G + g0)), xs);
      const __m512 z = zrow ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, zrow + r * G + g0)) : _mm512_set1_ps(zc);
      zacc[r] = _mm512_fmadd_ps(d, _mm512_mul_ps(z, qs), zacc[r]);
      _mm512_store_ps(dl[r], d);
    }
    for (int64_t c = 0; c < ng; ++c) {
      const int64_t gi = g0 + c;
      // two integer accumulators per row (even / odd vectors): a per-row lm_head group is 16+ vectors long, and
      // one vpdpbusd chain would wait on its latency; integer sums, so the split changes no result. Whole vectors
      // first, two at a time with fixed masks (a group size known at compile time unrolls them), then the
      // group's last partial vector, masked, on the chain its parity picks.
      __m512i v[NR], v2[NR];
      for (int r = 0; r < NR; ++r) v[r] = _mm512_setzero_si512(), v2[r] = _mm512_setzero_si512();
      const int8_t* xg = xq.q + gi * gg;
      int64_t u = 0;
      for (; u + 2 <= nfull; u += 2) {
        const __m512i x0 = _mm512_loadu_si512(xg + u * 64), x1 = _mm512_loadu_si512(xg + u * 64 + 64);
        for (int r = 0; r < NR; ++r) {
          const uint8_t* pr = prow + r * stride + gi * gb;
          if constexpr (ONE_CHAIN && !UNPACKED && B == 3) {
            const __m512i w = _mm512_maskz_loadu_epi8(low_bits64(16 * B), pr + u * 8 * B);
            const __m512i c0 = _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, _mm512_permutexvar_epi8(perm, w)), mask);
            const __m512i c1 =
                _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, _mm512_permutexvar_epi8(perm_hi, w)), mask);
            v[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(v[r], c0, x0), c1, x1);
          } else if constexpr (ONE_CHAIN) {
            v[r] = _mm512_dpbusd_epi32(v[r], whole_codes64<B, UNPACKED>(pr, u, full_cm, perm, ctrl, mask), x0);
            v[r] = _mm512_dpbusd_epi32(v[r], whole_codes64<B, UNPACKED>(pr, u + 1, full_cm, perm, ctrl, mask), x1);
          } else {
            v[r] = _mm512_dpbusd_epi32(v[r], whole_codes64<B, UNPACKED>(pr, u, full_cm, perm, ctrl, mask), x0);
            v2[r] = _mm512_dpbusd_epi32(v2[r], whole_codes64<B, UNPACKED>(pr, u + 1, full_cm, perm, ctrl, mask), x1);
          }
        }
      }
      if (u < nfull) {  // an odd count of whole vectors: the last one is even
        const __m512i x0 = _mm512_loadu_si512(xg + u * 64);
        for (int r = 0; r < NR; ++r)
          v[r] = _mm512_dpbusd_epi32(v[r], whole_codes64<B, UNPACKED>(prow + r * stride + gi * gb, u, full_cm, perm,
                                                                      ctrl, mask), x0);
        ++u;
      }
      if (tail) {
        const __m512i xv = _mm512_maskz_loadu_epi8(tail_xm, xg + u * 64);
        for (int r = 0; r < NR; ++r) {
          const uint8_t* pr = prow + r * stride + gi * gb;
          const __m512i codes = UNPACKED ? _mm512_maskz_loadu_epi8(tail_xm, pr + u * 64)
                                         : codes64<B>(pr + u * 8 * B, tail_cm, perm, ctrl, mask);
          if ((u & 1) && !ONE_CHAIN)
            v2[r] = _mm512_dpbusd_epi32(v2[r], codes, xv);
          else
            v[r] = _mm512_dpbusd_epi32(v[r], codes, xv);
        }
      }
      for (int r = 0; r < NR; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(dl[r][c]),
                                 _mm512_cvtepi32_ps(ONE_CHAIN ? v[r] : _mm512_add_epi32(v[r], v2[r])), acc[r]);
    }
  }
  if (acc_out) {
    for (int r = 0; r < NR; ++r) acc_out[r] = acc[r], acc_out[NR + r] = zacc[r];
    return;
  }
  for (int r = 0; r < NR; ++r) out[r] = fold16(acc[r]) - fold16(zacc[r]);
}

// int8_rows_512 with the common group sizes unrolled at compile time.
template <int B, int NR, bool UNPACKED>
MOE_T_AVX512 inline void int8_rows_512g(const uint8_t* prow, int64_t stride, const uint16_t* srow,
                                        const uint16_t* zrow, float zc, const QuantRow& xq, int64_t G, int64_t g,
                                        float* out) {
  if (g == 128)
    int8_rows_512<B, NR, UNPACKED, 128>(prow, stride, srow, zrow, zc, xq, G, g, out);
  else if (g == 64)
    int8_rows_512<B, NR, UNPACKED, 64>(prow, stride, srow, zrow, zc, xq, G, g, out);
  else
    int8_rows_512<B, NR, UNPACKED, 0>(prow, stride, srow, zrow, zc, xq, G, g, out);
}

// Decode (one activation row): rows n0..n1 one after another (one linear stream, see below), their lane sums
// folded 16 rows at a time.
template <int B, int GC>
MOE_T_AVX512 inline void int8_decode_512(const uint8_t* base, const uint16_t* sbase, const uint16_t* zbase,
                                         int64_t row_bytes, int64_t G, int64_t g, const QuantRow& xq, float* y,
                                         int64_t n0, int64_t n1) {
  const float zc = symmetric_zero(B);
  auto zr = [&](int64_t n) { return zbase ? zbase + n * G : nullptr; };
  const __m512i lane_of_row = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  int64_t n = n0;
  for (; n + 16 <= n1; n += 16) {
    __m512 acc[16], zacc[16];
    for (int i = 0; i < 16; ++i) {
      __m512 az[2];
      int8_rows_512<B, 1, false, GC>(base + (n + i) * row_bytes, row_bytes, sbase + (n + i) * G, zr(n + i), zc, xq,
                                     G, g, nullptr, az);
      acc[i] = az[0], zacc[i] = az[1];
    }
    _mm512_storeu_ps(y + n, _mm512_permutexvar_ps(lane_of_row, _mm512_sub_ps(fold16x16(acc), fold16x16(zacc))));
  }
  for (; n < n1; ++n)
    int8_rows_512<B, 1, false, GC>(base + n * row_bytes, row_bytes, sbase + n * G, zr(n), zc, xq, G, g, y + n);
}

// One weight row of K codes (K a multiple of 8) as K bytes; `out` holds K rounded up to 64 (zeros past K).
template <int B>
MOE_T_AVX512 inline void unpack_row_512(const uint8_t* prow, int64_t K, uint8_t* out) {
  static constexpr Codes64Tables<B> tab{};
  const __m512i perm = _mm512_loadu_si512(tab.perm), ctrl = _mm512_loadu_si512(tab.ctrl);
  const __m512i mask = _mm512_set1_epi8(char(B == 8 ? 0xff : (1 << B) - 1));
  for (int64_t c = 0; c * 64 < K; ++c) {
    const int64_t rem = K - c * 64;
    _mm512_storeu_si512(out + c * 64,
                        codes64<B>(prow + c * 8 * B, low_bits64(rem >= 64 ? 8 * B : rem * B / 8), perm, ctrl, mask));
  }
}

// Prefill: 4 unpacked rows share each activation load. Decode reads one row at a time: the packed rows are one
// linear stream, which the hardware prefetcher follows best. Measured by CPU time on weights 2-4x the L3
// (gate_up 5632 x 1024 3-bit, down 1024 x 2816 2-bit): 1 row 27 G codes/s, 2 or 4 interleaved rows 17-20, and a
// software prefetch 1-8 KB ahead 15% slower (the hardware one already keeps up); from L2, 4 rows are 25% faster.
// (Those rates predate the unrolled group loop of int8_rows_512, which made decode of g = 128 rows 1.4-2.7x
// faster per code: 3-bit 5632 x 1024 from 17 to 23 G codes/s, 2-bit 1024 x 2816 from 14 to 38, same results.)
// Since then decode runs near the same speed from DRAM and from cache (5632 x 1024 2-bit: 13.7 vs 14.8 GB/s of
// weight bytes, one thread, Zen 4), so it is bound by instructions, not bytes: one vpdpbusd chain per group,
// one load for two 3-bit vectors and the 16-row fold (int8_decode_512) took 1.1-1.25x off from cache (3-bit
// K = 1024 17.1 -> 21.4 GB/s, 4-bit 25 -> 30), and 2-interleaved rows or a software prefetch are still slower
// from DRAM (6-11 against 13-15 GB/s).
constexpr int kInt8Rows512 = 4;

template <int B>
MOE_T_AVX512 inline void int8_range_512(const uint8_t* base, const uint16_t* sbase, const uint16_t* zbase,
                                        int64_t row_bytes, int64_t G, int64_t g, int R, const QuantRow* xq,
                                        float* const* y, int64_t n0, int64_t n1) {
  constexpr int NR = kInt8Rows512;
  const float zc = symmetric_zero(B);
  auto zr = [&](int64_t n) { return zbase ? zbase + n * G : nullptr; };
  if (R == 1) {
    if (g == 128)
      int8_decode_512<B, 128>(base, sbase, zbase, row_bytes, G, g, xq[0], y[0], n0, n1);
    else if (g == 64)
      int8_decode_512<B, 64>(base, sbase, zbase, row_bytes, G, g, xq[0], y[0], n0, n1);
    else
      int8_decode_512<B, 0>(base, sbase, zbase, row_bytes, G, g, xq[0], y[0], n0, n1);
    return;
  }
  const int64_t K = G * g, kp = pad_to(K, 64);
  static thread_local std::vector<uint8_t> codes;
  codes.resize(size_t(NR * kp));
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    for (int i = 0; i < NR; ++i) unpack_row_512<B>(base + (n + i) * row_bytes, K, codes.data() + i * kp);
    float out[NR];
    for (int r = 0; r < R; ++r) {
      int8_rows_512g<B, NR, true>(codes.data(), kp, sbase + n * G, zr(n), zc, xq[r], G, g, out);
      for (int i = 0; i < NR; ++i) y[r][n + i] = out[i];
    }
  }
  for (; n < n1; ++n) {
    unpack_row_512<B>(base + n * row_bytes, K, codes.data());
    for (int r = 0; r < R; ++r) int8_rows_512g<B, 1, true>(codes.data(), kp, sbase + n * G, zr(n), zc, xq[r], G, g, y[r] + n);
  }
}

// ---------------------------------------------------------------- int8, AVX2 / AVX-VNNI: 16 codes per vector

// 16 codes of B bits (2B bytes) as 16 int16: the unit is broadcast to both 128-bit halves, vpshufb puts the two
// bytes holding code j into word j, a multiply by 2^(8 - (jB mod 8)) and a shift by 8 align it, one AND keeps
// B bits. SAFE copies the unit first (the 16-byte load would read past the end of the weight).
template <int B>
struct Codes16Tables {
  int8_t shuf[32];
  int16_t mul[16];
  constexpr Codes16Tables() : shuf(), mul() {
    for (int j = 0; j < 16; ++j) {
      const int byte = (j * B) >> 3;
      shuf[2 * j] = int8_t(byte);
      shuf[2 * j + 1] = byte + 1 < 16 ? int8_t(byte + 1) : int8_t(-128);
      mul[j] = int16_t(1 << (8 - ((j * B) & 7)));
    }
  }
};

template <int B, bool SAFE>
MOE_T_AVX2 inline __m256i codes16_i16(const uint8_t* p, __m256i shuf, __m256i mul, __m256i mask) {
  __m128i raw;
  if constexpr (SAFE) {
    alignas(16) uint8_t tmp[16] = {0};
    std::memcpy(tmp, p, 2 * B);
    raw = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
  } else {
    raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  }
  if constexpr (B == 8) {
    return _mm256_cvtepu8_epi16(raw);
  } else {
    const __m256i v = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(raw), shuf);
    return _mm256_and_si256(_mm256_srli_epi16(_mm256_mullo_epi16(v, mul), 8), mask);
  }
}

// Two vectors of code-pair sums (16 codes each, lane j = codes 2j, 2j+1) -> the 8 quad sums of their 32 codes in
// order (lane l = codes 4l .. 4l+3): vphaddd pairs them within 128-bit halves, vpermq restores the order.
MOE_T_AVX2 inline __m256i quads8(__m256i p0, __m256i p1) {
  return _mm256_permute4x64_epi64(_mm256_hadd_epi32(p0, p1), 0xD8);
}

MOE_T_AVX2 inline float fold8x2(__m256 lo, __m256 hi) {
  const __m256 s8 = _mm256_add_ps(lo, hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

MOE_T_AVX2 inline __m256i ld16(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// 64 codes of 2 or 4 bits as two vectors of 32 bytes in code order (codes 0-31, codes 32-63): byte j of a 256-bit
// vector times activation byte j, four at a time, is then lane j / 4 of the canonical order (quads of 4 codes),
// so an unsigned x signed byte dot product (vpmaddubsw + vpmaddwd, or AVX-VNNI's vpdpbusd) gives the `lo` / `hi`
// quad sums directly: 32 codes a product instead of 16, and no vphaddd. 4-bit: the low and high nibbles of 32
// bytes interleaved (codes 2i, 2i+1); 2-bit: the four 2-bit fields of 16 bytes interleaved by bytes, then words.
template <int B>
MOE_T_AVX2 inline void codes64_bytes(const uint8_t* p, __m256i& c0, __m256i& c1) {
  static_assert(B == 2 || B == 4, "widths whose codes fill whole bytes in fixed positions");
  if constexpr (B == 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i m = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_and_si256(v, m), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    const __m256i u0 = _mm256_unpacklo_epi8(lo, hi), u1 = _mm256_unpackhi_epi8(lo, hi);  // [0-15|32-47] [16-31|48-63]
    c0 = _mm256_permute2x128_si256(u0, u1, 0x20);
    c1 = _mm256_permute2x128_si256(u0, u1, 0x31);
  } else {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x03);
    const __m128i f0 = _mm_and_si128(v, m), f1 = _mm_and_si128(_mm_srli_epi16(v, 2), m);
    const __m128i f2 = _mm_and_si128(_mm_srli_epi16(v, 4), m), f3 = _mm_and_si128(_mm_srli_epi16(v, 6), m);
    const __m128i a0 = _mm_unpacklo_epi8(f0, f1), a1 = _mm_unpackhi_epi8(f0, f1);  // words (4i, 4i+1)
    const __m128i b0 = _mm_unpacklo_epi8(f2, f3), b1 = _mm_unpackhi_epi8(f2, f3);  // words (4i+2, 4i+3)
    c0 = _mm256_set_m128i(_mm_unpackhi_epi16(a0, b0), _mm_unpacklo_epi16(a0, b0));
    c1 = _mm256_set_m128i(_mm_unpackhi_epi16(a1, b1), _mm_unpacklo_epi16(a1, b1));
  }
}

MOE_T_AVX2 inline __m256i ld8(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// The AVX2 and AVX-VNNI int8 row kernels differ only in the 16-product step (vpmaddwd + vpaddd, or one
// vpdpwssd), the 32-byte step of 2- and 4-bit codes (vpmaddubsw + vpmaddwd + vpaddd, or one vpdpbusd) and in
// their target; one macro writes both so the steps inline into each. The canonical 16 lanes are two 8-lane
// vectors: `lo` the quads of codes 0-31 of each 64, `hi` of codes 32-63. Groups of whole 16s. The byte step
// (groups of whole 64s) decodes 2- and 4-bit rows 1.5-2.6x faster from cache (AVX2 on Zen 4, one thread:
// 2-bit 5632 x 1024 2.3-2.9 -> 5.1 GB/s, 4-bit 4.8-6.6 -> 12.1); 3-bit stays on the 16-bit step (4.4 GB/s).
#define MOE_CORE_INT8_LANES8(NAME, ATTR, DOT, DOTB)                                                                 \
  template <int B>                                                                                                \
  ATTR inline float NAME##_row(const uint8_t* prow, int64_t row_bytes, const uint16_t* srow, const uint16_t* zrow, \
                               float zc, const QuantRow& xq, int64_t G, int64_t g) {                              \
    static constexpr Codes16Tables<B> tab{};                                                                      \
    const __m256i shuf = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tab.shuf));                          \
    const __m256i mul = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tab.mul));                            \
    const __m256i mask = _mm256_set1_epi16(int16_t(B == 8 ? 0xff : (1 << B) - 1));                                \
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps(), zlo = _mm256_setzero_ps(),                         \
           zhi = _mm256_setzero_ps();                                                                             \
    alignas(32) float dl[16];                                                                                     \
    for (int64_t g0 = 0; g0 < G; g0 += 16) {                                                                      \
      const int64_t ng = std::min<int64_t>(16, G - g0);                                                           \
      alignas(16) uint16_t st[16] = {0}, zt[16] = {0};                                                            \
      alignas(32) float xs[16] = {0.f}, qs[16] = {0.f};                                                           \
      std::memcpy(st, srow + g0, size_t(ng) * 2);                                                                 \
      if (zrow) std::memcpy(zt, zrow + g0, size_t(ng) * 2);                                                       \
      std::memcpy(xs, xq.scale + g0, size_t(ng) * 4);                                                             \
      std::memcpy(qs, xq.qsum + g0, size_t(ng) * 4);                                                              \
      for (int h = 0; h < 2; ++h) {                                                                               \
        const __m256 d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(st + 8 * h))), \
                                       _mm256_load_ps(xs + 8 * h));                                               \
        const __m256 z = zrow ? _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(zt + 8 * h)))     \
                              : _mm256_set1_ps(zc);                                                               \
        const __m256 zt8 = _mm256_fmadd_ps(d, _mm256_mul_ps(z, _mm256_load_ps(qs + 8 * h)), h ? zhi : zlo);       \
        if (h) zhi = zt8; else zlo = zt8;                                                                         \
        _mm256_store_ps(dl + 8 * h, d);                                                                           \
      }                                                                                                           \
      if constexpr (B == 2 || B == 4) {                                                                           \
        if (g % 64 == 0) { /* byte products of whole 64-code blocks: quad sums with no vphaddd */                 \
          for (int64_t c = 0; c < ng; ++c) {                                                                      \
            const int64_t code0 = (g0 + c) * g;                                                                   \
            __m256i plo = _mm256_setzero_si256(), phi = plo;                                                      \
            for (int64_t b = 0; b < g; b += 64) {                                                                 \
              __m256i c0, c1;                                                                                     \
              codes64_bytes<B>(prow + (code0 + b) * B / 8, c0, c1);                                               \
              plo = DOTB(plo, c0, ld8(xq.q + code0 + b));                                                         \
              phi = DOTB(phi, c1, ld8(xq.q + code0 + b + 32));                                                    \
            }                                                                                                     \
            const __m256 dv = _mm256_set1_ps(dl[c]);                                                              \
            lo = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(plo), lo);                                                \
            hi = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(phi), hi);                                                \
          }                                                                                                       \
          continue;                                                                                               \
        }                                                                                                         \
      }                                                                                                           \
      for (int64_t c = 0; c < ng; ++c) {                                                                          \
        const int64_t code0 = (g0 + c) * g, nv = g / 16;                                                          \
        /* 16 codes at a time; vector s adds to lane quad (s mod 4) of the canonical order. The 16-byte reads */  \
        /* of codes16_i16 run past a vector's 2B bytes: only a group near the row's end checks each vector. */    \
        __m256i p0 = _mm256_setzero_si256(), p1 = p0, p2 = p0, p3 = p0;                                           \
        const uint8_t* pc = prow + code0 * B / 8;                                                                 \
        const int16_t* px = xq.q16 + code0;                                                                       \
        if ((code0 + g - 16) * B / 8 + 16 <= row_bytes) {                                                         \
          int64_t s = 0;                                                                                          \
          for (; s + 4 <= nv; s += 4) {                                                                           \
            p0 = DOT(p0, (codes16_i16<B, false>(pc + 2 * B * s, shuf, mul, mask)), ld16(px + 16 * s));            \
            p1 = DOT(p1, (codes16_i16<B, false>(pc + 2 * B * (s + 1), shuf, mul, mask)), ld16(px + 16 * (s + 1))); \
            p2 = DOT(p2, (codes16_i16<B, false>(pc + 2 * B * (s + 2), shuf, mul, mask)), ld16(px + 16 * (s + 2))); \
            p3 = DOT(p3, (codes16_i16<B, false>(pc + 2 * B * (s + 3), shuf, mul, mask)), ld16(px + 16 * (s + 3))); \
          }                                                                                                       \
          if (s < nv) p0 = DOT(p0, (codes16_i16<B, false>(pc + 2 * B * s, shuf, mul, mask)), ld16(px + 16 * s));  \
          if (s + 1 < nv)                                                                                         \
            p1 = DOT(p1, (codes16_i16<B, false>(pc + 2 * B * (s + 1), shuf, mul, mask)), ld16(px + 16 * (s + 1))); \
          if (s + 2 < nv)                                                                                         \
            p2 = DOT(p2, (codes16_i16<B, false>(pc + 2 * B * (s + 2), shuf, mul, mask)), ld16(px + 16 * (s + 2))); \
        } else {                                                                                                  \
          for (int64_t s = 0; s < nv; ++s) {                                                                      \
            const int64_t off = (code0 + 16 * s) * B / 8;                                                         \
            const __m256i cv = off + 16 <= row_bytes ? codes16_i16<B, false>(prow + off, shuf, mul, mask)         \
                                                     : codes16_i16<B, true>(prow + off, shuf, mul, mask);         \
            const __m256i xv = ld16(px + 16 * s);                                                                 \
            switch (s & 3) {                                                                                      \
              case 0: p0 = DOT(p0, cv, xv); break;                                                                \
              case 1: p1 = DOT(p1, cv, xv); break;                                                                \
              case 2: p2 = DOT(p2, cv, xv); break;                                                                \
              default: p3 = DOT(p3, cv, xv);                                                                      \
            }                                                                                                     \
          }                                                                                                       \
        }                                                                                                         \
        const __m256 dv = _mm256_set1_ps(dl[c]);                                                                  \
        lo = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(quads8(p0, p1)), lo);                                           \
        hi = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(quads8(p2, p3)), hi);                                           \
      }                                                                                                           \
    }                                                                                                             \
    return fold8x2(lo, hi) - fold8x2(zlo, zhi);                                                                   \
  }                                                                                                               \
  template <int B>                                                                                                \
  ATTR inline void NAME##_range(const uint8_t* base, const uint16_t* sbase, const uint16_t* zbase,                 \
                                int64_t row_bytes, int64_t G, int64_t g, int R, const QuantRow* xq, float* const* y, \
                                int64_t n0, int64_t n1) {                                                          \
    const float zc = symmetric_zero(B);                                                                           \
    for (int64_t n = n0; n < n1; ++n)                                                                             \
      for (int r = 0; r < R; ++r)                                                                                 \
        y[r][n] = NAME##_row<B>(base + n * row_bytes, row_bytes, sbase + n * G, zbase ? zbase + n * G : nullptr,  \
                                zc, xq[r], G, g);                                                                 \
  }

#define MOE_CORE_DOT_MADD(a, c, x) _mm256_add_epi32(a, _mm256_madd_epi16(c, x))
#define MOE_CORE_DOT_VNNI(a, c, x) _mm256_dpwssd_avx_epi32(a, c, x)
// unsigned codes x signed activation bytes; a pair of 2- or 4-bit products fits int16 (2 * 15 * 127), so
// vpmaddubsw never saturates here
#define MOE_CORE_DOTB_MADD(a, c, x) _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), _mm256_set1_epi16(1)))
#define MOE_CORE_DOTB_VNNI(a, c, x) _mm256_dpbusd_avx_epi32(a, c, x)
MOE_CORE_INT8_LANES8(int8_avx2, MOE_T_AVX2, MOE_CORE_DOT_MADD, MOE_CORE_DOTB_MADD)
MOE_CORE_INT8_LANES8(int8_avxvnni, MOE_T_AVXVNNI, MOE_CORE_DOT_VNNI, MOE_CORE_DOTB_VNNI)
#undef MOE_CORE_DOT_MADD
#undef MOE_CORE_DOT_VNNI
#undef MOE_CORE_DOTB_MADD
#undef MOE_CORE_DOTB_VNNI
#undef MOE_CORE_INT8_LANES8
#endif  // MOE_CORE_X86

// The int8 kernel family for a weight on the active path: 64-code vectors take every group (whole 8-code units,
// masked), 16-code vectors groups of whole 16s; anything else runs the scalar loop (the same arithmetic).
enum class Int8Kind { Scalar, Avx2, AvxVnni, Avx512 };

inline Int8Kind int8_kind(const PackedWeight& w) {
  const Path p = active_path();
  if (p == Path::Avx512Vnni) return Int8Kind::Avx512;
  if (p != Path::Scalar && w.group % 16 == 0) return p == Path::AvxVnni ? Int8Kind::AvxVnni : Int8Kind::Avx2;
  return Int8Kind::Scalar;
}

template <int B>
inline void int8_range_scalar(const uint8_t* base, const uint16_t* sbase, const uint16_t* zbase, int64_t row_bytes,
                              int64_t G, int64_t g, int R, const QuantRow* xq, float* const* y, int64_t n0,
                              int64_t n1) {
  const float zc = symmetric_zero(B);
  for (int64_t n = n0; n < n1; ++n)
    for (int r = 0; r < R; ++r)
      y[r][n] = int8_row_scalar<B>(base + n * row_bytes, sbase + n * G, zbase ? zbase + n * G : nullptr, zc, xq[r], G,
                                   g);
}

template <int B, class Par>
inline void int8_rows_gemv(const PackedWeight& w, int64_t slot, int R, const QuantRow* xq, float* const* y,
                           Par&& par) {
  const int64_t N = w.rows, G = w.groups(), g = w.group, row_bytes = w.row_bytes();
  const uint8_t* base = w.codes + slot * N * row_bytes;
  const uint16_t* sbase = w.scale + slot * N * G;
  const uint16_t* zbase = w.zero ? w.zero + slot * N * G : nullptr;
  switch (int8_kind(w)) {
#ifdef MOE_CORE_X86
    case Int8Kind::Avx512:
      for_row_blocks(N, par, [&](int64_t n0, int64_t n1) {
        int8_range_512<B>(base, sbase, zbase, row_bytes, G, g, R, xq, y, n0, n1);
      });
      return;
    case Int8Kind::AvxVnni:
      for_row_blocks(N, par, [&](int64_t n0, int64_t n1) {
        int8_avxvnni_range<B>(base, sbase, zbase, row_bytes, G, g, R, xq, y, n0, n1);
      });
      return;
    case Int8Kind::Avx2:
      for_row_blocks(N, par, [&](int64_t n0, int64_t n1) {
        int8_avx2_range<B>(base, sbase, zbase, row_bytes, G, g, R, xq, y, n0, n1);
      });
      return;
#endif
    default:
      for_row_blocks(N, par, [&](int64_t n0, int64_t n1) {
        int8_range_scalar<B>(base, sbase, zbase, row_bytes, G, g, R, xq, y, n0, n1);
      });
  }
}

template <class Par>
inline void int8_gemv(const PackedWeight& w, int64_t slot, int R, const QuantRow* xq, float* const* y, Par&& par) {
  switch (w.bits) {
    case 1: int8_rows_gemv<1>(w, slot, R, xq, y, par); break;
    case 2: int8_rows_gemv<2>(w, slot, R, xq, y, par); break;
    case 3: int8_rows_gemv<3>(w, slot, R, xq, y, par); break;
    case 4: int8_rows_gemv<4>(w, slot, R, xq, y, par); break;
    case 5: int8_rows_gemv<5>(w, slot, R, xq, y, par); break;
    case 6: int8_rows_gemv<6>(w, slot, R, xq, y, par); break;
    case 7: int8_rows_gemv<7>(w, slot, R, xq, y, par); break;
    default: int8_rows_gemv<8>(w, slot, R, xq, y, par); break;
  }
}

// ------------------------------------------------------------------------------------------ per-thread scratch

// Reused per calling thread (an op runs on the calling thread; the host's loop only splits output rows).
struct Scratch {
  std::vector<float> xs, sums, h, a, asums, as, y;
  std::vector<int64_t> order;
  QuantBuf qx, qa;
};

inline Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

// out[t] = sum_j y[t*k + j] * w[t*k + j] over the top-k pairs of token t, in order j. `fused`: one rounding per
// term (fma; what the vector builds always did, and the int8 arithmetic on every path), else multiply, then add
// (the exact arithmetic on the scalar path, as the portable build did).
inline void weighted_sum(float* out, const float* y, const float* w, int64_t T, int64_t k, int64_t H, bool fused) {
#ifdef MOE_CORE_X86
  if (active_path() != Path::Scalar) {
    std::vector<const float*> rows(static_cast<size_t>(k));
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < k; ++j) rows[j] = y + (t * k + j) * H;
      weighted_sum_fma(out + t * H, rows.data(), w + t * k, k, H);
    }
    return;
  }
#endif
  for (int64_t t = 0; t < T; ++t) {
    float* o = out + t * H;
    for (int64_t h = 0; h < H; ++h) o[h] = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const float wt = w[t * k + j];
      const float* yr = y + (t * k + j) * H;
      if (fused) {
        for (int64_t h = 0; h < H; ++h) o[h] = std::fma(yr[h], wt, o[h]);
      } else {
        for (int64_t h = 0; h < H; ++h) o[h] += yr[h] * wt;
      }
    }
  }
}

}  // namespace detail

// ------------------------------------------------------------------------------------------ the entry points

// y[M, N] = x[M, K] @ W^T for one packed 2-D weight (w.experts == 1).
template <class Par>
void packed_linear(const float* x, int64_t M, const PackedWeight& w, float* y, Accuracy acc, Par&& par) {
  using namespace detail;
  const int64_t K = w.cols, N = w.rows;
  Scratch& sc = scratch();
  const float* src[kMaxRows];
  float* yout[kMaxRows];
  if (acc == Accuracy::Int8) {
    std::vector<QuantRow> xq(kMaxInt8Rows);
    std::vector<float*> yo(kMaxInt8Rows);
    sc.qx.resize(int(std::min<int64_t>(kMaxInt8Rows, M)), K, w.group);
    for (int64_t r0 = 0; r0 < M; r0 += kMaxInt8Rows) {
      const int n = int(std::min<int64_t>(kMaxInt8Rows, M - r0));
      for (int i = 0; i < n; ++i) xq[i] = quantize_into(sc.qx, i, x + (r0 + i) * K, K, w.group), yo[i] = y + (r0 + i) * N;
      int8_gemv(w, 0, n, xq.data(), yo.data(), par);
    }
    return;
  }
  sc.xs.resize(size_t(kMaxRows) * K);
  sc.sums.resize(size_t(kMaxRows) * w.groups());
  const float* xin[kMaxRows];
  const float* xsum[kMaxRows];
  for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
    const int n = int(std::min<int64_t>(kMaxRows, M - r0));
    for (int i = 0; i < n; ++i) src[i] = x + (r0 + i) * K, yout[i] = y + (r0 + i) * N;
    prepare_rows(src, n, w, sc.xs.data(), sc.sums.data(), xin, xsum);
    exact_gemv(w, 0, n, xin, xsum, yout, par);
  }
}

// The routed SwiGLU experts of one MoE layer: for every (token, expert) pair, gate_up mat-vec, SiLU(gate) * up,
// down mat-vec, routing-weighted sum over the token's top-k pairs. gate_up stacks are [E_b, 2I, H*b/8] (gate
// rows first), down stacks [E_b, H, I*b/8]; expert e lives in width group expert_group[e], slot expert_slot[e].
// Pairs of one expert share one pass over its packed rows (up to kMaxRows at a time). y: [T, H].
template <class Par>
void moe_ffn(const float* x, int64_t T, int64_t H, const int64_t* topk_ids, const float* topk_weights, int64_t k,
             const int32_t* expert_group, const int32_t* expert_slot, const PackedWeight* gate_up,
             const PackedWeight* down, int32_t n_groups, float* y, Accuracy acc, Par&& par) {
  using namespace detail;
  (void)n_groups;
  const int64_t S = T * k, I = gate_up[0].rows / 2;
  // Pairs of one expert per pass over its packed rows: the exact kernels keep kMaxRows accumulators in
  // registers; the int8 kernels cut each weight row once per batch (prefill) and take up to kMaxInt8Rows.
  const int cap = acc == Accuracy::Int8 ? kMaxInt8Rows : kMaxRows;
  Scratch& sc = scratch();
  const int64_t Gmax = std::max<int64_t>(H, I) / 8;  // a group holds at least 8 values
  sc.xs.resize(size_t(cap) * H);
  sc.sums.resize(size_t(cap) * Gmax);
  sc.h.resize(size_t(cap) * 2 * I);
  sc.a.resize(size_t(cap) * I);
  sc.as.resize(size_t(cap) * I);
  sc.asums.resize(size_t(cap) * Gmax);
  sc.y.resize(size_t(S) * H);
  // pairs grouped by expert, up to `cap` per batch: a batch reads each weight row once
  sc.order.clear();
  std::vector<bool> done(size_t(S), false);
  std::vector<std::pair<int64_t, int>> batches;  // (first index into order, size)
  for (int64_t s = 0; s < S; ++s) {
    if (done[s]) continue;
    int64_t start = int64_t(sc.order.size());
    int cnt = 0;
    for (int64_t t = s; t < S; ++t) {
      if (done[t] || topk_ids[t] != topk_ids[s]) continue;
      done[t] = true;
      sc.order.push_back(t);
      if (++cnt == cap) batches.emplace_back(start, cnt), start += cnt, cnt = 0;
    }
    if (cnt) batches.emplace_back(start, cnt);
  }
  // Int8: each token's row is quantized once (blocks of the first width group's group size) and shared by all
  // its experts; a width group with another group size quantizes its own blocks.
  const int64_t g_up = gate_up[0].group;
  if (acc == Accuracy::Int8) {
    sc.qx.resize(int(T), H, g_up);
    for (int64_t t = 0; t < T; ++t) quantize_into(sc.qx, int(t), x + t * H, H, g_up);
  }
  std::vector<const float*> src(cap), xin(cap), xsum(cap);
  std::vector<float*> hout(cap), yout(cap);
  std::vector<QuantRow> xq(cap);
  QuantBuf other;
  for (const auto& bt : batches) {
    const int R = bt.second;
    const int64_t* pairs = sc.order.data() + bt.first;
    const int64_t e = topk_ids[pairs[0]];
    const PackedWeight& gu = gate_up[expert_group[e]];
    const PackedWeight& gd = down[expert_group[e]];
    for (int r = 0; r < R; ++r) src[r] = x + (pairs[r] / k) * H, hout[r] = sc.h.data() + r * 2 * I;
    if (acc == Accuracy::Int8) {
      if (gu.group != g_up) other.resize(R, H, gu.group);
      for (int r = 0; r < R; ++r) {
        const int64_t t = pairs[r] / k;
        xq[r] = gu.group == g_up ? QuantRow{sc.qx.q.data() + t * sc.qx.kp, sc.qx.q16.data() + t * sc.qx.kp,
                                            sc.qx.scale.data() + t * sc.qx.gp, sc.qx.qsum.data() + t * sc.qx.gp}
                                 : quantize_into(other, r, src[r], H, gu.group);
      }
      int8_gemv(gu, expert_slot[e], R, xq.data(), hout.data(), par);
    } else {
      prepare_rows(src.data(), R, gu, sc.xs.data(), sc.sums.data(), xin.data(), xsum.data());
      exact_gemv(gu, expert_slot[e], R, xin.data(), xsum.data(), hout.data(), par);
    }
    for (int r = 0; r < R; ++r) {
      const float* hr = hout[r];
      float* ar = sc.a.data() + r * I;
      for (int64_t i = 0; i < I; ++i) ar[i] = silu(hr[i]) * hr[I + i];
      src[r] = ar;
      yout[r] = sc.y.data() + pairs[r] * H;
    }
    if (acc == Accuracy::Int8) {
      sc.qa.resize(R, I, gd.group);
      for (int r = 0; r < R; ++r) xq[r] = quantize_into(sc.qa, r, src[r], I, gd.group);
      int8_gemv(gd, expert_slot[e], R, xq.data(), yout.data(), par);
    } else {
      prepare_rows(src.data(), R, gd, sc.as.data(), sc.asums.data(), xin.data(), xsum.data());
      exact_gemv(gd, expert_slot[e], R, xin.data(), xsum.data(), yout.data(), par);
    }
  }
  weighted_sum(y, sc.y.data(), topk_weights, T, k, H, acc == Accuracy::Int8);
}

namespace detail {
template <int B>
inline void gather_range(bool vec, const uint8_t* base, const uint16_t* sbase, const uint16_t* zbase, float zc,
                         int64_t rb, int64_t G, int64_t g, int R, const float* const* x, const float* const* xsum,
                         float* const* y, int64_t n0, int64_t n1) {
#ifdef MOE_CORE_X86
  if (vec) return rows_range_avx2<B>(base, sbase, zbase, zc, rb, G, g, R, x, xsum, y, n0, n1);
#endif
  (void)vec;
  rows_range_scalar<B>(base, sbase, zbase, zc, rb, G, g, R, x, xsum, y, n0, n1);
}
}  // namespace detail

// One width group's routed mat-vec: y[s, :] = W[idx[s]] @ x[s] for S rows (idx[s] < 0: row left as is).
// x must be prepared by the caller: xsum [S, G] the group sums of the unscaled rows, and x pre-scaled by
// 2^-(j*b) lane-wise where gather_prescaled(w) says so. Rows of one expert share a pass (4 at a time).
inline bool gather_prescaled(const PackedWeight& w) {
  return active_path() != Path::Scalar && w.bits <= 3;
}

template <class Par>
void gather_gemv(const float* x, const float* xsum, const int64_t* idx, int64_t S, const PackedWeight& w, float* y,
                 Par&& par) {
  using namespace detail;
  const int64_t N = w.rows, K = w.cols, G = w.groups();
  // pairs grouped by expert, up to 4 per batch: a batch unpacks each weight row once
  std::vector<std::vector<int64_t>> batches;
  {
    std::vector<bool> done(size_t(S), false);
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
  // The 8-lane kernels (this op never used the 16-lane ones).
  const bool vec = active_path() != Path::Scalar;
  const int64_t rb = w.row_bytes(), g = w.group;
  const float zc = symmetric_zero(w.bits);
  for_row_blocks(N, par, [&](int64_t n0, int64_t n1) {
    for (const auto& bt : batches) {
      const float* xr[4];
      const float* xsr[4];
      float* outr[4];
      const int R = int(bt.size());
      for (int i = 0; i < R; ++i) xr[i] = x + bt[i] * K, xsr[i] = xsum + bt[i] * G, outr[i] = y + bt[i] * N;
      const int64_t slot = idx[bt[0]];
      const uint8_t* base = w.codes + slot * N * rb;
      const uint16_t* sbase = w.scale + slot * N * G;
      const uint16_t* zbase = w.zero ? w.zero + slot * N * G : nullptr;
      switch (w.bits) {
        case 1: gather_range<1>(vec, base, sbase, zbase, zc, rb, G, g, R, xr, xsr, outr, n0, n1); break;
        case 2: gather_range<2>(vec, base, sbase, zbase, zc, rb, G, g, R, xr, xsr, outr, n0, n1); break;
        case 3: gather_range<3>(vec, base, sbase, zbase, zc, rb, G, g, R, xr, xsr, outr, n0, n1); break;
        case 4: gather_range<4>(vec, base, sbase, zbase, zc, rb, G, g, R, xr, xsr, outr, n0, n1); break;
        case 5: gather_range<5>(vec, base, sbase, zbase, zc, rb, G, g, R, xr, xsr, outr, n0, n1); break;
        case 6: gather_range<6>(vec, base, sbase, zbase, zc, rb, G, g, R, xr, xsr, outr, n0, n1); break;
        case 7: gather_range<7>(vec, base, sbase, zbase, zc, rb, G, g, R, xr, xsr, outr, n0, n1); break;
        default: gather_range<8>(vec, base, sbase, zbase, zc, rb, G, g, R, xr, xsr, outr, n0, n1); break;
      }
    }
  });
}

// Embedding rows, exact dequantize: out[i, :] = (q[ids[i], :] - z) * s, the formula of runtime.layout.dequantize.
inline void packed_gather(const int64_t* ids, int64_t n, const PackedWeight& w, float* out) {
  const int64_t K = w.cols, G = w.groups(), g = w.group, rb = w.row_bytes();
  const uint32_t mask = w.bits == 8 ? 0xffu : (1u << w.bits) - 1u;
  const float zc = symmetric_zero(w.bits);
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* p = w.codes + ids[i] * rb;
    const uint16_t* s = w.scale + ids[i] * G;
    const uint16_t* z = w.zero ? w.zero + ids[i] * G : nullptr;
    float* o = out + i * K;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t bit = k * w.bits;
      uint32_t v = p[bit >> 3];
      if ((bit & 7) + w.bits > 8) v |= uint32_t(p[(bit >> 3) + 1]) << 8;
      const float q = float((v >> (bit & 7)) & mask);
      const int64_t gi = k / g;
      o[k] = (q - (z ? fp16_to_fp32(z[gi]) : zc)) * fp16_to_fp32(s[gi]);
    }
  }
}

}  // namespace moe_export_core
