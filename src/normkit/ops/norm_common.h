// Shared by the normalization kernels (norm_kernel.cpp: (N, C, S) and row layouts; channels_last_kernel.cpp:
// channels-minor layouts): float32 loads and stores of each dtype, compensated sums, the robust-statistics
// steps of one group (exponent and scaling, the plain-formula check, inv_std, the saved Stat, x_hat, the
// backward coefficients) and the split multiplier of the given-statistics path. See norm_kernel.cpp's top
// comment for the formulas.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace nk_norm {

constexpr int64_t kChunk = 2048;
constexpr int kMaxExp = 126;   // 2**126 and 2**-126 are normal floats

// Loads and stores in float32. bfloat16 is converted with bit operations (which vectorize; c10's conversion
// operators do not): the same round-to-nearest-even and quiet NaN as c10::BFloat16.
inline float ld(float v) { return v; }
inline float ld(c10::Half v) { return static_cast<float>(v); }
inline float ld(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T> inline T to_t(float v) { return static_cast<T>(v); }
template <> inline c10::BFloat16 to_t<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint16_t r = std::isnan(v) ? uint16_t(0x7FC0) : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return c10::BFloat16(r, c10::BFloat16::from_bits());
}

// p[i] = v in T; bfloat16 as raw bits (a store of the class type kept some loops from vectorizing)
inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t r = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC00000u : u + 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(r >> 16);
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(c10::Half* p, int64_t i, float v) { p[i] = static_cast<c10::Half>(v); }
inline void store(c10::BFloat16* p, int64_t i, float v) { reinterpret_cast<uint16_t*>(p)[i] = bf16_bits(v); }

struct Acc {  // Kahan-compensated sum of chunk totals
  float s = 0.f, c = 0.f;
  inline void add(float v) { const float y = v - c; const float t = s + y; c = (t - s) - y; s = t; }
};

// Per group, saved for backward: e, pivot, mean_d, r, k, mean_x, var_x (biased), unused.
struct Stat { float e, piv, mean_d, r, k, mean_x, var_x, pad; };
static_assert(sizeof(Stat) == 8 * sizeof(float), "Stat is 8 floats");

// std::ilogb(v): from the exponent bits when v is normal, else libm (0, subnormals, inf, NaN)
inline int fast_ilogb(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const int biased = static_cast<int>((u >> 23) & 0xFFu);
  return biased != 0 && biased != 0xFF ? biased - 127 : static_cast<int>(std::ilogb(v));
}

inline int exponent_of(float amax) {  // floor(log2(amax)), clamped to the normal range; 0 gives the minimum
  if (!(amax > 0.f)) return -kMaxExp;
  if (std::isinf(amax)) return kMaxExp;
  return std::min(std::max(fast_ilogb(amax), -kMaxExp), kMaxExp);
}

// 2**q for q in [-126, 127], built from its bits
inline float exp2i(int q) {
  const uint32_t u = static_cast<uint32_t>(q + 127) << 23;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// t * 2**q for any integer q, with a single rounding. Where 2**q is a normal float, t * 2**q is that one
// correctly rounded product, the value ldexp returns; the multiply replaces a libm call per group (with
// rows of 64-1024 values these per-group calls were a noticeable part of the time).
inline float pow2(float t, int q) { return (q >= -126 && q <= 127) ? t * exp2i(q) : std::ldexp(t, q); }

// A per-group multiplier r * 2**q usable in one float multiply: finite and normal, else 0 (use ldexp per element)
inline float multiplier(float r, int q) {
  const float m = pow2(r, q);
  return (std::isfinite(m) && m >= FLT_MIN) ? m : 0.f;
}

// The plain (unscaled) formulas are used for a group when a cheap check proves them safe: every value and
// every square of a difference of two values stays normal and finite in float32, for up to 2**24 values.
constexpr float kPlainLo = 0x1p-50f, kPlainHi = 0x1p50f, kTinyVar = 0x1p-100f;

// eps = m * 2**q (frexp), kept apart so that inv_std never forms eps where it would underflow
struct Eps {
  float m; int q; bool zero;
  explicit Eps(double eps) : q(0) { m = static_cast<float>(std::frexp(eps, &q)); zero = eps == 0.0; }
};

// _stats.inv_std: 1/sqrt(a * 4**e + eps) = r * 2**k with both terms under the root at most about 4
inline void inv_std(float a, int e, const Eps& eps, float& r, int& k) {
  constexpr int bound = 3 * kMaxExp;
  const double h_eps = eps.zero ? -std::numeric_limits<double>::infinity() : std::floor((eps.q - 1) / 2.0);
  const double h_a = a > 0.f ? e + std::floor(fast_ilogb(a) / 2.0) : -std::numeric_limits<double>::infinity();
  const int h = static_cast<int>(std::min<double>(std::max<double>(std::max(h_a, h_eps), -bound), bound));
  const float u = pow2(a, 2 * (e - h)) + pow2(eps.m, eps.q - 2 * h);
  r = 1.f / std::sqrt(u);
  k = -h;
}

// One pass over a group gives amax = max|x| and s1 = sum(d), s2 = sum(d^2) of d = x - pivot, unscaled. The
// plain formula serves when no value or square can leave float32's normal range and the shifted one-pass
// variance s2 - s1^2/n keeps at least 1/16 of s2 (at most 4 bits lost to cancellation): then true, with
// mean_d and m2 = sum((d - mean_d)^2) set. Otherwise the group takes the robust recipe (robust_scale, then
// two passes over the scaled and shifted values).
inline bool plain_moments(float amax, float s1, float s2, int64_t count, bool center, float& mean_d, float& m2) {
  const float n = static_cast<float>(count);
  bool plain = count <= (int64_t(1) << 24) && amax >= kPlainLo && amax <= kPlainHi && std::isfinite(s2);
  mean_d = 0.f;
  m2 = s2;
  if (plain && center) {
    mean_d = s1 / n;
    m2 = s2 - s1 * mean_d;
    plain = m2 >= s2 * 0.0625f && (m2 == 0.f ? s2 == 0.f : m2 >= n * kTinyVar);
  } else if (plain) {
    plain = m2 >= n * kTinyVar;
  }
  return plain;
}

// The robust recipe's scaling of a group: e = floor(log2 max|x|), s = 2**-e, pivot x[first] * s (0 for RMS)
inline void robust_scale(float amax, float piv0, bool center, int& e, float& s, float& piv) {
  e = exponent_of(amax);
  s = pow2(1.f, -e);
  piv = center ? piv0 * s : 0.f;
}

// The statistics of a group of n values from m2 = sum((d - mean_d)**2) of d = x * 2**-e - piv
inline Stat make_stat(float m2, float mean_d, float piv, int e, float n, const Eps& eps, bool center) {
  const float a = std::max(m2, 0.f) / n;
  float r; int k;
  inv_std(a, e, eps, r, k);
  Stat out{};
  out.e = static_cast<float>(e); out.piv = piv; out.mean_d = mean_d; out.r = r; out.k = static_cast<float>(k);
  out.mean_x = center ? pow2(piv + mean_d, e) : 0.f;
  out.var_x = pow2(a, 2 * e);
  return out;
}

// Backward of a group, from the sums over it of gs = g * 2**-eg - g0 * 2**-eg (g = dy * w, g0 its first
// value) and of gs * x_hat: dx = ((gs - mg) - x_hat * mgx) * m2, or * r * 2**q2 per element where m2 is 0.
// The unscaled sums (eg = 0) serve when every |g| lies in [2**-50, 2**50] (plain_grad); otherwise they are
// taken again with g scaled by 2**-eg, eg = floor(log2 max|g|).
inline bool plain_grad(float gmax) { return gmax >= kPlainLo && gmax <= kPlainHi; }
struct DxCoef {
  float mg, mgx, m2; int q2;
  DxCoef(const Stat& st, float sum_gs, float sum_gsx, float n, int eg, bool center)
      : mg(center ? sum_gs / n : 0.f), mgx(sum_gsx / n), m2(0.f), q2(static_cast<int>(st.k) + eg) {
    m2 = multiplier(st.r, q2);
  }
};

// x_hat for element v of a group with statistics st (m: the fast multiplier, or 0)
struct XHat {
  float s, piv, mean_d, r, m; int q;
  explicit XHat(const Stat& st) : s(pow2(1.f, -static_cast<int>(st.e))), piv(st.piv), mean_d(st.mean_d), r(st.r),
    m(multiplier(st.r, static_cast<int>(st.k + st.e))), q(static_cast<int>(st.k + st.e)) {}
  inline float slow(float v) const { return pow2(((v * s - piv) - mean_d) * r, q); }
};

#if defined(__AVX512F__)
// bfloat16 <-> float32 for 16 lanes, bit-exact with ld / bf16_bits (round to nearest even, NaN -> 0x7FC0).
// Written out because GCC leaves the bfloat16 output loops scalar when they are inlined into the kernels
// (no zmm instructions in the built library; perf showed the scalar store loop taking most of the time).
inline __m512 ld16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void st16(c10::BFloat16* p, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
#endif

struct Factor {  // w * rstd = m * 2**q; f = m * 2**q as one float when that is exact (normal or zero), else slow
  float m, f; int q; bool one;
  Factor(float w, float rs) {
    const int ew = exponent_of(std::abs(w)), er = exponent_of(std::abs(rs));
    m = (w * std::ldexp(1.f, -ew)) * (rs * std::ldexp(1.f, -er));
    q = ew + er;
    f = std::ldexp(m, q);
    one = m == 0.f || (std::isfinite(f) && std::abs(f) >= FLT_MIN);
  }
};

// v * m * 2**q (1 <= |m| < 4) with no intermediate overflow where the result is finite: for q < 0 the value
// is first scaled down by 2**-4 (exact for the large values where it matters; tiny ones give 0 either way)
inline float apply_split(float v, float m, int q) {
  return q < 0 ? std::ldexp((v * 0.0625f) * m, q + 4) : std::ldexp(v * m, q);
}

template <typename F>
void dispatch_dtype(const torch::Tensor& x, const char* name, F f) {
  switch (x.scalar_type()) {
    case at::kFloat: f(float()); break;
    case at::kBFloat16: f(c10::BFloat16()); break;
    case at::kHalf: f(c10::Half()); break;
    default: TORCH_CHECK(false, name, ": expected float32, bfloat16 or float16 input, got ", x.scalar_type());
  }
}

// The outputs of a backward entry point: dx (x's shape and dtype) and float32 dweight, dbias of n values,
// each an empty tensor where it is not needed.
inline std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> grad_buffers(const torch::Tensor& x, int64_t n,
                                                                            bool need_dx, bool need_param) {
  auto fopt = x.options().dtype(at::kFloat);
  return {need_dx ? torch::empty(x.sizes(), x.options()) : torch::empty({0}, x.options()),
          need_param ? torch::empty({n}, fopt) : torch::empty({0}, fopt),
          need_param ? torch::empty({n}, fopt) : torch::empty({0}, fopt)};
}

inline void check_param(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, what,
              ": expected a contiguous float32 tensor of ", n, " elements");
}

}  // namespace nk_norm
