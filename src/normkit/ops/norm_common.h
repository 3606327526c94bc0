// Shared by the statistics kernels (norm_kernel.cpp: (N, C, S) and row layouts; channels_last_kernel.cpp:
// channels-minor layouts): float32 loads and stores of each dtype, compensated sums, the argument checks of
// every entry point, and the per-group steps of normkit/_spec.py that both kernels implement -- each below
// names the spec function it implements. Two of them are the spec's *plain* one-pass formulas, taken only
// where the spec's proof conditions hold (plain_moments, plain_grad); their bounds come from _spec.PLAIN,
// passed by normkit/_native.py at build time (NK_PLAIN_*), so the conditions are written in one place.
// Where a step's float32 arithmetic differs from the spec's torch ops (a one-pass sum, an ldexp instead of
// three exact multiplies), the difference is rounding only, within the tolerance every backend is tested to.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX__)
#include <immintrin.h>  // F16C conversions and non-temporal stores (F16C and AVX-512 imply AVX)
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

// Vectors of 16 float lanes (GCC vector extensions: one AVX-512 register where built for it, a pair of AVX2 ones
// otherwise). The hand-vectorized loops are written with them rather than left to the auto-vectorizer, which
// kept some accumulators in memory, a whole tile scalar, or the bfloat16 output loops scalar once inlined into
// the kernels (perf showed the scalar store loop taking most of the time). GCC 12 lowers a 16-lane compare or
// select lane by lane in scalar code where the target has no 16-lane registers, so the code below has neither.
typedef float V __attribute__((vector_size(64)));
typedef uint32_t VU __attribute__((vector_size(64)));
typedef int32_t VI __attribute__((vector_size(64)));
typedef uint16_t VH __attribute__((vector_size(32)));
// the same, unaligned, for stores typed as float / uint16_t (a memcpy store may alias anything, and the compiler
// then reloads every pointer it holds in memory after each one)
typedef float VStore __attribute__((vector_size(64), aligned(4)));
typedef uint16_t VHStore __attribute__((vector_size(32), aligned(2)));
constexpr int kLanes16 = 16;

// Loads and stores of 16 values of T as float lanes, bit-exact with ld / store: bfloat16 by bf16_bits' operations
// in every lane (round to nearest even, NaN -> 0x7FC0; the NaN test as a sign bit, not a compare); float16 by
// F16C's conversions, the ones c10::Half uses where F16C is enabled (round to nearest even), else lane by lane.
inline V vload(const float* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
inline V vload(const c10::BFloat16* p) {
  VH h;
  std::memcpy(&h, p, sizeof(VH));
  return (V)(__builtin_convertvector(h, VU) << 16);
}
inline V vload(const c10::Half* p) {
  V v;
#if defined(__AVX512F__)
  v = (V)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  const __m256 h[2] = {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
  std::memcpy(&v, h, sizeof(V));
#else
  for (int i = 0; i < kLanes16; ++i) v[i] = ld(p[i]);
#endif
  return v;
}
inline void vstore(float* p, V v) { *reinterpret_cast<VStore*>(p) = v; }
inline void vstore(c10::BFloat16* p, V v) {
  const VU u = (VU)v;
  const VU nan = (VU)((VI)(0x7F800000u - (u & 0x7FFFFFFFu)) >> 31);  // all ones where |u| > inf's bits: NaN
  const VU r = ((u + 0x7FFFu + ((u >> 16) & 1u)) & ~nan) | (nan & 0x7FC00000u);
  *reinterpret_cast<VHStore*>(p) = __builtin_convertvector(r >> 16, VH);
}
inline void vstore(c10::Half* p, V v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
  __m256 h[2];
  std::memcpy(h, &v, sizeof(V));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(h[0], _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(h[1], _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < kLanes16; ++i) store(p, i, v[i]);
#endif
}

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

// _spec.exponent: floor(log2(amax)), clamped to the normal range; 0 gives the minimum
inline int exponent_of(float amax) {
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

// _spec.mul_pow2: t * 2**q for any integer q, with a single rounding. Where 2**q is a normal float, t * 2**q is
// that one correctly rounded product, the value ldexp returns; the multiply replaces a libm call per group (with
// rows of 64-1024 values these per-group calls were a noticeable part of the time).
inline float pow2(float t, int q) { return (q >= -126 && q <= 127) ? t * exp2i(q) : std::ldexp(t, q); }

// A per-group multiplier r * 2**q usable in one float multiply: finite and normal, else 0 (use ldexp per element)
inline float multiplier(float r, int q) {
  const float m = pow2(r, q);
  return (std::isfinite(m) && m >= FLT_MIN) ? m : 0.f;
}

// _spec.PLAIN, from normkit/_native.py (a build without them would silently use other bounds than the spec)
#if !defined(NK_PLAIN_LO) || !defined(NK_PLAIN_HI) || !defined(NK_PLAIN_TINY_VAR) || !defined(NK_PLAIN_KEEP) || \
    !defined(NK_PLAIN_MAX_COUNT)
#error "the plain-formula bounds NK_PLAIN_* come from normkit._spec.PLAIN: build through normkit._native"
#endif
constexpr float kPlainLo = NK_PLAIN_LO, kPlainHi = NK_PLAIN_HI, kTinyVar = NK_PLAIN_TINY_VAR, kKeep = NK_PLAIN_KEEP;
constexpr int64_t kPlainMaxCount = NK_PLAIN_MAX_COUNT;

// eps = m * 2**q (frexp), kept apart so that inv_std never forms eps where it would underflow
struct Eps {
  float m; int q; bool zero;
  explicit Eps(double eps) : q(0) { m = static_cast<float>(std::frexp(eps, &q)); zero = eps == 0.0; }
};

// _spec.inv_std (_spec.scaled_sum, then _spec.power_pair at power -1/2): 1/sqrt(a * 4**e + eps) = r * 2**k
// with both terms under the root at most about 4
inline void inv_std(float a, int e, const Eps& eps, float& r, int& k) {
  constexpr int bound = 3 * kMaxExp;
  const double h_eps = eps.zero ? -std::numeric_limits<double>::infinity() : std::floor((eps.q - 1) / 2.0);
  const double h_a = a > 0.f ? e + std::floor(fast_ilogb(a) / 2.0) : -std::numeric_limits<double>::infinity();
  const int h = static_cast<int>(std::min<double>(std::max<double>(std::max(h_a, h_eps), -bound), bound));
  const float u = pow2(a, 2 * (e - h)) + pow2(eps.m, eps.q - 2 * h);
  r = 1.f / std::sqrt(u);
  k = -h;
}

// _spec.plain_moments: from one pass over a group, amax = max|x| and s1 = sum(d), s2 = sum(d^2) of
// d = x - pivot, unscaled; true (with mean_d and m2 = sum((d - mean_d)^2) set) where the spec's proof
// conditions hold. Otherwise the group takes _spec.moments (robust_scale, then two passes over the scaled
// and shifted values).
inline bool plain_moments(float amax, float s1, float s2, int64_t count, bool center, float& mean_d, float& m2) {
  const float n = static_cast<float>(count);
  bool plain = count <= kPlainMaxCount && amax >= kPlainLo && amax <= kPlainHi && std::isfinite(s2);
  mean_d = 0.f;
  m2 = s2;
  if (plain && center) {
    mean_d = s1 / n;
    m2 = s2 - s1 * mean_d;
    plain = m2 >= s2 * kKeep && (m2 == 0.f ? s2 == 0.f : m2 >= n * kTinyVar);
  } else if (plain) {
    plain = m2 >= n * kTinyVar;
  }
  return plain;
}

// _spec.moments' scaling of a group: e = _spec.group_exponent (floor(log2 max|x|)), s = 2**-e, pivot = the
// scaled first value (_spec.first; 0 for RMS)
inline void robust_scale(float amax, float piv0, bool center, int& e, float& s, float& piv) {
  e = exponent_of(amax);
  s = pow2(1.f, -e);
  piv = center ? piv0 * s : 0.f;
}

// _spec.standardize_from_moments' statistics of a group of n values, from its Moments (e, piv, mean_d, m2:
// m2 = sum((d - mean_d)**2) of d = x * 2**-e - piv): r, k from inv_std(m2 / n, e); mean_x and var_x as
// Moments.mean_x / var_x
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

// Backward of a group from its reduced sums (_spec.grad_sums, _spec.standardize_backward_from_sums): with
// gs = g * 2**-eg - g0 * 2**-eg (g = dy * w, g0 its first value; no shift for RMS), sum(gs) and sum(gs * x_hat)
// give dx = ((gs - mg) - x_hat * mgx) * m2, or * r * 2**q2 per element where m2 is 0. The unscaled sums
// (eg = 0) serve where _spec.plain_grad_ok holds (plain_grad); otherwise they are taken again with g scaled by
// 2**-eg, eg = _spec.group_exponent of g.
inline bool plain_grad(float gmax) { return gmax >= kPlainLo && gmax <= kPlainHi; }
struct DxCoef {
  float mg, mgx, m2; int q2;
  DxCoef(const Stat& st, float sum_gs, float sum_gsx, float n, int eg, bool center)
      : mg(center ? sum_gs / n : 0.f), mgx(sum_gsx / n), m2(0.f), q2(static_cast<int>(st.k) + eg) {
    m2 = multiplier(st.r, q2);
  }
};

// x_hat for element v of a group with statistics st, as _spec.standardize_from_moments forms it:
// ((v * 2**-e - piv) - mean_d) * r * 2**(k + e), the last factor one float m where it is normal (else 0: slow)
struct XHat {
  float s, piv, mean_d, r, m; int q;
  explicit XHat(const Stat& st) : s(pow2(1.f, -static_cast<int>(st.e))), piv(st.piv), mean_d(st.mean_d), r(st.r),
    m(multiplier(st.r, static_cast<int>(st.k + st.e))), q(static_cast<int>(st.k + st.e)) {}
  inline float slow(float v) const { return pow2(((v * s - piv) - mean_d) * r, q); }
};

// _spec.eval_factor: the given statistics' rstd = r * 2**k (_spec.inv_std with e = 0) times w, split as
// m * 2**q (w's mantissa times r, the exponents summed); f = m * 2**q as one float when that is exact (normal
// or zero), else the split is applied per element (apply_split)
struct Factor {
  float r, m, f; int k, q; bool one;
  Factor(float w, float var, const Eps& eps) {
    inv_std(var, 0, eps, r, k);
    const int ew = exponent_of(std::abs(w));
    m = (w * std::ldexp(1.f, -ew)) * r;
    q = ew + k;
    f = std::ldexp(m, q);
    one = m == 0.f || (std::isfinite(f) && std::abs(f) >= FLT_MIN);
  }
  float rstd() const { return std::ldexp(r, k); }  // inf only where 1/sqrt(var + eps) leaves float32 itself
};

// Factor of every channel, computed once per call (rows of the same channel share it)
inline std::vector<Factor> channel_factors(const float* w, const float* var, int64_t C, double eps) {
  const Eps eps_split(eps);
  std::vector<Factor> out;
  out.reserve(C);
  for (int64_t c = 0; c < C; ++c) out.emplace_back(w[c], var[c], eps_split);
  return out;
}

// _spec.apply_factor: v * m * 2**q (1/3 <= |m| < 4) with no intermediate overflow where the result is finite:
// for q < 0 the value is first scaled down by 2**-4 (exact for the large values where it matters; tiny ones
// give 0 either way)
inline float apply_split(float v, float m, int q) {
  return q < 0 ? std::ldexp((v * 0.0625f) * m, q + 4) : std::ldexp(v * m, q);
}

// _spec.eval_dweight for one channel of n values (at(i, dy, x) reads the i-th): sum(dy * x_hat) with rstd applied
// last, to the sum of dy and x - mean each scaled by a power of two (x - mean in halves where it overflows,
// _spec.centered), so no product and no partial sum overflows where the result does not. The kernels' fast sum
// is sum(dy * ((x - mean) * rstd)); a channel whose fast sum left the range is summed again here.
template <typename A>
inline float eval_dweight(int64_t n, A at, float mu, const Factor& fa) {
  auto centered = [mu](float xv, int& h) {
    const float diff = xv - mu;
    h = std::isinf(diff) && std::isfinite(xv) && std::isfinite(mu) ? 1 : 0;
    return h ? xv * 0.5f - mu * 0.5f : diff;
  };
  float gmax = 0.f, dmax = 0.f;
  int hmax = 0;
  for (int64_t i = 0; i < n; ++i) {
    float d, xv;
    int h;
    at(i, d, xv);
    const float diff = centered(xv, h);
    gmax = std::max(gmax, std::abs(d)); dmax = std::max(dmax, std::abs(diff)); hmax = std::max(hmax, h);
  }
  const int eg = exponent_of(gmax), ed = exponent_of(dmax) + hmax;
  Acc acc;
  for (int64_t i = 0; i < n; ++i) {
    float d, xv;
    int h;
    at(i, d, xv);
    const float diff = centered(xv, h);
    acc.add(pow2(d, -eg) * pow2(diff, h - ed));
  }
  return apply_split(acc.s, fa.r, fa.k + eg + ed);
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

// ---- argument checks of every entry point: before any kernel reads memory ----

// x: a non-empty contiguous CPU tensor of a kernel dtype (float32, bfloat16, float16) with at least min_dim dims
inline void check_input(const torch::Tensor& x, int64_t min_dim, const char* op) {
  TORCH_CHECK(x.defined(), op, ": expected an input tensor, got an undefined one");
  TORCH_CHECK(x.device().is_cpu(), op, ": expected a CPU tensor, got one on ", x.device(),
              " (the native kernels are CPU only; normkit's eager path serves other devices)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": expected float32, bfloat16 or float16, got ", x.scalar_type(), " (normkit's eager path serves float64)");
  TORCH_CHECK(x.dim() >= min_dim, op, ": expected at least ", min_dim, " dims, got sizes ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": expected a contiguous tensor, got sizes ", x.sizes(), " and strides ", x.strides());
  TORCH_CHECK(x.numel() > 0, op, ": expected a non-empty tensor, got sizes ", x.sizes(),
              " (normkit returns empty inputs before calling a kernel)");
}

// The (N, C, S) a layout reads x as, C given: rows (R, D = C) for layout 0 (N = R, S = D); (N, C, S) or, channels
// last, (N, S, C) with N = x.size(0) otherwise. C must divide x's elements (and N * C, for the channel layouts).
struct Extent { int64_t N, C, S; };
inline Extent extent(const torch::Tensor& x, int64_t layout, int64_t C, const char* op) {
  TORCH_CHECK(C >= 1 && x.numel() % C == 0, op, ": C=", C, " must be positive and divide the input's ", x.numel(),
              " elements (sizes ", x.sizes(), ")");
  if (layout == 0) return {x.numel() / C, C, C};
  const int64_t N = x.size(0);
  TORCH_CHECK(x.numel() % (N * C) == 0, op, ": expected (N, C, *) or (N, *, C) with N=", N, " and C=", C,
              ", got sizes ", x.sizes());
  return {N, C, x.numel() / (N * C)};
}

// dy: x's sizes, dtype and device, contiguous
inline void check_grad(const torch::Tensor& dy, const torch::Tensor& x, const char* op) {
  TORCH_CHECK(dy.defined() && dy.device() == x.device() && dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() &&
              dy.is_contiguous(), op, ": expected a contiguous dy of x's sizes ", x.sizes(), ", dtype ", x.scalar_type(),
              " and device");
}

// a per-group or per-channel parameter as the kernels read it: float32, contiguous, n values (any shape)
inline void check_param(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n,
              what, ": expected a contiguous float32 CPU tensor of ", n, " elements, got sizes ", t.sizes(), ", dtype ",
              t.scalar_type(), " on ", t.device());
}

// stats: (groups, 8) float32, as the forward entry points return them
inline void check_stats(const torch::Tensor& stats, int64_t groups, const char* op) {
  TORCH_CHECK(stats.defined() && stats.device().is_cpu() && stats.scalar_type() == at::kFloat && stats.is_contiguous() &&
              stats.dim() == 2 && stats.size(0) == groups && stats.size(1) == 8, op,
              ": expected the (", groups, ", 8) float32 statistics of the forward call, got sizes ", stats.sizes());
}

}  // namespace nk_norm
