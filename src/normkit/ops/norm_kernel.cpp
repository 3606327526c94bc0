// Fused CPU kernels for the statistics-based normalizations (layer, RMS, group, instance, batch norm): the
// functions of normkit/_spec.py, group by group, each loop below naming the spec function it implements.
//
// Forward (stats_forward): _spec.moments -- the one-pass plain_moments where _spec.plain_moments proves it safe,
// else robust_scale and two passes over the scaled, shifted values -- then _spec.standardize_from_moments
// (make_stat, XHat) and _spec.affine (output_seg). Backward (stats_backward): _spec.grad_sums then
// _spec.standardize_backward_from_sums (DxCoef), with _spec.affine_backward's parameter sums in the same pass.
// Given statistics (eval_forward / eval_backward): _spec.affine_with_stats (Factor, apply_split) and
// _spec.affine_with_stats_backward.
//
// A group is read once from memory: its passes (max, sum, second moment, output) run over data still in
// L1/L2 (a row, an (n, group) block, or a channel of N segments). Only the input and 8 floats of statistics
// per group are kept for backward, which recomputes x_hat on the fly. Sums are taken in float32 over chunks
// of kChunk elements (vectorized lanes) and the chunk totals are added with Kahan compensation, so a group of
// 10^5 values sums about as accurately as torch's cascade sum. float16/bfloat16 are read and written in their
// own type and computed in float32; float64 is not handled here (the eager path serves it).
//
// Layouts (all contiguous):  ROWS x (R, D): a group per row, affine per element (layer / RMS norm);
//   GROUPS x (N, C, S): a group per (n, g) = Cg consecutive channels, affine per channel (group, instance norm);
//   CHANNELS x (N, C, S): a group per channel over N segments of S (batch norm in training).
// Channels-last inputs have their own kernels (channels_last_kernel.cpp, layout 3); the steps of a group that
// both use (plain_moments, robust_scale, make_stat, DxCoef, XHat, Factor) live in norm_common.h.

#include "norm_common.h"

namespace nk_norm {

constexpr int kRows = 0, kGroups = 1, kChannels = 2;

struct Shape {
  int64_t layout, N, C, S, G, Cg;  // ROWS: N rows of S = D values
  int64_t groups() const { return layout == kRows ? N : layout == kGroups ? N * G : C; }
  int64_t nseg() const { return layout == kRows ? 1 : layout == kGroups ? Cg : N; }
  int64_t stride() const { return layout == kChannels ? C * S : S; }
  int64_t base(int64_t gi) const {
    if (layout == kRows) return gi * S;
    if (layout == kGroups) return ((gi / G) * C + (gi % G) * Cg) * S;
    return gi * S;
  }
  int64_t channel(int64_t gi, int64_t j) const { return layout == kGroups ? (gi % G) * Cg + j : gi; }
  int64_t count() const { return nseg() * S; }
};


constexpr int kLanes = 64;  // independent float accumulators: 4 AVX-512 (8 AVX2) registers, no long dependency chain

template <int W = kLanes>
inline float reduce_lanes(float* acc) {  // pairwise: also the more accurate order
  for (int w = W / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// sum of f(i) over [i0, i1)
template <typename F>
inline float lane_sum(int64_t i0, int64_t i1, F f) {
  float acc[kLanes] = {};
  int64_t i = i0;
  for (; i + kLanes <= i1; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) acc[j] += f(i + j);
  }
  float tail = 0.f;
  for (; i < i1; ++i) tail += f(i);
  return reduce_lanes(acc) + tail;
}

// both sums of f(i) -> (a, b) over [i0, i1)
template <typename F>
inline void lane_sum2(int64_t i0, int64_t i1, F f, float& out_a, float& out_b) {
  float acc_a[kLanes] = {}, acc_b[kLanes] = {};
  int64_t i = i0;
  for (; i + kLanes <= i1; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) { float a, b; f(i + j, a, b); acc_a[j] += a; acc_b[j] += b; }
  }
  float ta = 0.f, tb = 0.f;
  for (; i < i1; ++i) { float a, b; f(i, a, b); ta += a; tb += b; }
  out_a = reduce_lanes(acc_a) + ta;
  out_b = reduce_lanes(acc_b) + tb;
}

template <typename F>
inline float lane_max(int64_t n, F f) {  // max of f(i) >= 0 over [0, n)
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) acc[j] = std::max(acc[j], f(i + j));
  }
  float m = 0.f;
  for (; i < n; ++i) m = std::max(m, f(i));
  for (int j = 0; j < kLanes; ++j) m = std::max(m, acc[j]);
  return m;
}

// One pass, several reductions of f(i, ...) over [i0, i1) with 32 lanes each: a max (of values >= 0) and
// sums. (Written out per arity: outputs through scalar references vectorize; a small array would not.)
template <typename F>
inline void lane_max_sum2(int64_t i0, int64_t i1, F f, float* out) {
  constexpr int W = 32;
  float am[W] = {}, a1[W] = {}, a2[W] = {};
  int64_t i = i0;
  for (; i + W <= i1; i += W) {
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      float m, s1, s2;
      f(i + j, m, s1, s2);
      am[j] = std::max(am[j], m); a1[j] += s1; a2[j] += s2;
    }
  }
  float m = 0.f, t1 = 0.f, t2 = 0.f;
  for (; i < i1; ++i) { float vm, v1, v2; f(i, vm, v1, v2); m = std::max(m, vm); t1 += v1; t2 += v2; }
  for (int j = 0; j < W; ++j) m = std::max(m, am[j]);
  out[0] = m; out[1] = reduce_lanes<W>(a1) + t1; out[2] = reduce_lanes<W>(a2) + t2;
}

template <typename F>
inline void lane_max_sum4(int64_t i0, int64_t i1, F f, float* out) {
  constexpr int W = 32;
  float am[W] = {}, a1[W] = {}, a2[W] = {}, a3[W] = {}, a4[W] = {};
  int64_t i = i0;
  for (; i + W <= i1; i += W) {
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      float m, s1, s2, s3, s4;
      f(i + j, m, s1, s2, s3, s4);
      am[j] = std::max(am[j], m); a1[j] += s1; a2[j] += s2; a3[j] += s3; a4[j] += s4;
    }
  }
  float m = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f, t4 = 0.f;
  for (; i < i1; ++i) {
    float vm, v1, v2, v3, v4;
    f(i, vm, v1, v2, v3, v4);
    m = std::max(m, vm); t1 += v1; t2 += v2; t3 += v3; t4 += v4;
  }
  for (int j = 0; j < W; ++j) m = std::max(m, am[j]);
  out[0] = m; out[1] = reduce_lanes<W>(a1) + t1; out[2] = reduce_lanes<W>(a2) + t2;
  out[3] = reduce_lanes<W>(a3) + t3; out[4] = reduce_lanes<W>(a4) + t4;
}

template <typename T>
inline float amax_seg(const T* p, int64_t n) {
  return lane_max(n, [p](int64_t i) { return std::abs(ld(p[i])); });
}

template <typename T>
inline float amax_seg_w(const T* p, int64_t n, const float* w, float wc) {  // max |p * w|; w per element or wc
  if (w) return lane_max(n, [p, w](int64_t i) { return std::abs(ld(p[i]) * w[i]); });
  return lane_max(n, [p, wc](int64_t i) { return std::abs(ld(p[i]) * wc); });
}

// acc += sum(x * s - shift), in chunks: _spec.moments' sum(d) of the scaled, shifted values
template <typename T>
inline void sum_shifted(const T* p, int64_t n, float s, float shift, Acc& acc) {
  for (int64_t i0 = 0; i0 < n; i0 += kChunk)
    acc.add(lane_sum(i0, std::min(n, i0 + kChunk), [=](int64_t i) { return ld(p[i]) * s - shift; }));
}

// acc += sum(((x * s - shift) - mean)**2): _spec.moments' second pass, m2
template <typename T>
inline void sum_sq(const T* p, int64_t n, float s, float shift, float mean, Acc& acc) {
  for (int64_t i0 = 0; i0 < n; i0 += kChunk)
    acc.add(lane_sum(i0, std::min(n, i0 + kChunk), [=](int64_t i) {
      const float c = (ld(p[i]) * s - shift) - mean;
      return c * c;
    }));
}

template <typename T>
Stat group_stats(const T* x, const Shape& sh, int64_t gi, const Eps& eps, bool center) {
  const int64_t base = sh.base(gi), ns = sh.nseg(), L = sh.S, st = sh.stride();
  const float n = static_cast<float>(sh.count());
  // _spec.plain_moments' one pass: max |x| and the first two moments of d = x - pivot, unscaled.
  const float piv0 = center ? ld(x[base]) : 0.f;
  float amax = 0.f;
  Acc s1, s2;
  for (int64_t j = 0; j < ns; ++j) {
    const T* p = x + base + j * st;
    for (int64_t i0 = 0; i0 < L; i0 += kChunk) {
      float o[3];
      lane_max_sum2(i0, std::min(L, i0 + kChunk), [=](int64_t i, float& vm, float& v1, float& v2) {
        const float xv = ld(p[i]);
        const float d = xv - piv0;
        vm = std::abs(xv); v1 = d; v2 = d * d;
      }, o);
      amax = std::max(amax, o[0]); s1.add(o[1]); s2.add(o[2]);
    }
  }
  float mean_d, m2;
  int e = 0;
  float piv = piv0;
  if (!plain_moments(amax, s1.s, s2.s, sh.count(), center, mean_d, m2)) {  // _spec.moments: scale, shift, two passes
    float sc;
    robust_scale(amax, piv0, center, e, sc, piv);
    mean_d = 0.f;
    if (center) {
      Acc acc;
      for (int64_t j = 0; j < ns; ++j) sum_shifted(x + base + j * st, L, sc, piv, acc);
      mean_d = acc.s / n;
    }
    Acc q;
    for (int64_t j = 0; j < ns; ++j) sum_sq(x + base + j * st, L, sc, piv, mean_d, q);
    m2 = q.s;
  }
  return make_stat(m2, mean_d, piv, e, n, eps, center);
}

// The fast path of output_seg for float16 and bfloat16: 16 lanes at a time (vload / vstore), the same operations
// (and contractions to fused multiply-adds) as the float loop, the rest through the scalar loop. (The float loop
// vectorizes as it is; these conversions, inlined into the kernels, did not.)
template <typename T>
inline int64_t output_fast(const T* x, T* y, int64_t L, float s, float piv, float md, float m, const float* wp,
                           const float* bp, float wc, float bc) {
  int64_t i = 0;
  for (; i + kLanes16 <= L; i += kLanes16) {
    const V xh = ((vload(x + i) * s - piv) - md) * m;
    if (wp) vstore(y + i, xh * vload(wp + i) + vload(bp + i));
    else vstore(y + i, xh * wc + bc);
  }
  return i;
}

// _spec.affine: y = x_hat * w + b over one segment (x_hat as XHat forms it); w/b per element (wp, bp) or the
// constants wc, bc
template <typename T>
inline void output_seg(const T* x, T* y, int64_t L, const XHat& h, const float* wp, const float* bp, float wc, float bc) {
  const float s = h.s, piv = h.piv, md = h.mean_d, m = h.m;
  if constexpr (!std::is_same<T, float>::value) {
    if (m != 0.f) {
      const int64_t i0 = output_fast(x, y, L, s, piv, md, m, wp, bp, wc, bc);
      x += i0; y += i0; L -= i0;
      if (wp) { wp += i0; bp += i0; }
    }
  }
  if (m != 0.f) {
    if (wp) {
#pragma omp simd
      for (int64_t i = 0; i < L; ++i) store(y, i, (((ld(x[i]) * s - piv) - md) * m) * wp[i] + bp[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < L; ++i) store(y, i, (((ld(x[i]) * s - piv) - md) * m) * wc + bc);
    }
  } else {
    for (int64_t i = 0; i < L; ++i) {
      const float xh = h.slow(ld(x[i]));
      y[i] = to_t<T>(wp ? xh * wp[i] + bp[i] : xh * wc + bc);
    }
  }
}

// _spec.standardize + _spec.affine over every group (group_stats, then output_seg per segment)
template <typename T>
void stats_forward_impl(const T* x, T* y, Stat* stats, const Shape& sh, const float* w, const float* b, double eps, bool center) {
  const Eps eps_split(eps);
  const int64_t G = sh.groups();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, sh.count()));
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t gi = g0; gi < g1; ++gi) {
      const Stat st = group_stats(x, sh, gi, eps_split, center);
      stats[gi] = st;
      if (y == nullptr) continue;  // the statistics alone (stats_forward with output = false)
      const XHat h(st);
      const int64_t base = sh.base(gi), stride = sh.stride();
      for (int64_t j = 0; j < sh.nseg(); ++j) {
        const int64_t off = base + j * stride;
        if (sh.layout == kRows) {
          output_seg(x + off, y + off, sh.S, h, w, b, 1.f, 0.f);
        } else {
          const int64_t ch = sh.channel(gi, j);
          output_seg(x + off, y + off, sh.S, h, nullptr, nullptr, w[ch], b[ch]);
        }
      }
    }
  });
}

// Backward of one group. dw_seg/db_seg (per segment, channel layouts) or dw_el/db_el (per element, rows)
// receive the parameter-gradient sums when not null.
template <typename T>
void backward_group(const T* dy, const T* x, T* dx, const Shape& sh, int64_t gi, const Stat& st, const float* w,
                    bool center, bool need_dx, float* dw_seg, float* db_seg, float* dw_el, float* db_el) {
  const int64_t base = sh.base(gi), ns = sh.nseg(), L = sh.S, stride = sh.stride();
  const bool rows = sh.layout == kRows;
  const XHat h(st);
  const float s = h.s, piv = h.piv, md = h.mean_d, m = h.m;
  const float n = static_cast<float>(sh.count());
  auto wc_of = [&](int64_t j) { return rows ? 1.f : w[sh.channel(gi, j)]; };
  const float* wel = rows ? w : nullptr;
  const bool param = dw_seg || dw_el;
  const float g0 = center ? ld(dy[base]) * (rows ? w[0] : wc_of(0)) : 0.f;  // g's first value

  // _spec.grad_sums unscaled (eg = 0) and _spec.affine_backward's parameter sums, in one read of dy and x:
  // max |g|, sum(g - g0), sum((g - g0) * x_hat), sum(dy * x_hat), sum(dy).
  float gmax = 0.f;
  Acc a1, a2;
  for (int64_t j = 0; j < ns; ++j) {
    const T* dyp = dy + base + j * stride;
    const T* xp = x + base + j * stride;
    const float wc = wc_of(j);
    Acc aw, ab;
    for (int64_t i0 = 0; i0 < L; i0 += kChunk) {
      const int64_t i1 = std::min(L, i0 + kChunk);
      float o[5] = {};
      if (m != 0.f && rows) {
        if (param) {
          lane_max_sum2(i0, i1, [=](int64_t i, float& vm, float& v1, float& v2) {
            const float d = ld(dyp[i]);
            const float xh = ((ld(xp[i]) * s - piv) - md) * m;
            const float g = d * wel[i], gs = g - g0;
            vm = std::abs(g); v1 = gs; v2 = gs * xh;
            dw_el[i] += d * xh; db_el[i] += d;
          }, o);
        } else {
          lane_max_sum2(i0, i1, [=](int64_t i, float& vm, float& v1, float& v2) {
            const float xh = ((ld(xp[i]) * s - piv) - md) * m;
            const float g = ld(dyp[i]) * wel[i], gs = g - g0;
            vm = std::abs(g); v1 = gs; v2 = gs * xh;
          }, o);
        }
      } else if (m != 0.f) {
        lane_max_sum4(i0, i1, [=](int64_t i, float& vm, float& v1, float& v2, float& v3, float& v4) {
          const float d = ld(dyp[i]);
          const float xh = ((ld(xp[i]) * s - piv) - md) * m;
          const float g = d * wc, gs = g - g0;
          vm = std::abs(g); v1 = gs; v2 = gs * xh; v3 = d * xh; v4 = d;
        }, o);
      } else {
        for (int64_t i = i0; i < i1; ++i) {
          const float d = ld(dyp[i]);
          const float xh = h.slow(ld(xp[i]));
          const float g = d * (wel ? wel[i] : wc), gs = g - g0;
          o[0] = std::max(o[0], std::abs(g)); o[1] += gs; o[2] += gs * xh;
          if (rows && param) { dw_el[i] += d * xh; db_el[i] += d; }
          o[3] += d * xh; o[4] += d;
        }
      }
      gmax = std::max(gmax, o[0]); a1.add(o[1]); a2.add(o[2]); aw.add(o[3]); ab.add(o[4]);
    }
    if (!rows && param) { dw_seg[j] = aw.s; db_seg[j] = ab.s; }
  }
  if (!need_dx) return;

  // The unscaled sums are _spec.grad_sums' times 2**eg exactly where _spec.plain_grad_ok holds (plain_grad).
  // Otherwise redo them scaled by 2**-eg, as _spec.grad_sums does.
  int eg = 0;
  float sg = 1.f, g0s = g0;
  if (!plain_grad(gmax)) {
    eg = exponent_of(gmax);
    sg = std::ldexp(1.f, -eg);
    g0s = g0 * sg;
    a1 = Acc(); a2 = Acc();
    for (int64_t j = 0; j < ns; ++j) {
      const T* dyp = dy + base + j * stride;
      const T* xp = x + base + j * stride;
      const float wc = wc_of(j);
      for (int64_t i0 = 0; i0 < L; i0 += kChunk) {
        float t1 = 0.f, t2 = 0.f;
        for (int64_t i = i0; i < std::min(L, i0 + kChunk); ++i) {
          const float gs = ld(dyp[i]) * (wel ? wel[i] : wc) * sg - g0s;
          t1 += gs;
          t2 += gs * (m != 0.f ? ((ld(xp[i]) * s - piv) - md) * m : h.slow(ld(xp[i])));
        }
        a1.add(t1); a2.add(t2);
      }
    }
  }
  const DxCoef co(st, a1.s, a2.s, n, eg, center);
  const float mg = co.mg, mgx = co.mgx, m2 = co.m2;
  const int q2 = co.q2;
  // _spec.standardize_backward_from_sums: dx = (gs - mean(gs) - x_hat * mean(gs * x_hat)) * r * 2**(k + eg)
  for (int64_t j = 0; j < ns; ++j) {
    const T* dyp = dy + base + j * stride;
    const T* xp = x + base + j * stride;
    T* dxp = dx + base + j * stride;
    const float wc = wc_of(j);
    if (m != 0.f && m2 != 0.f && wel) {
#pragma omp simd
      for (int64_t i = 0; i < L; ++i) {
        const float gs = ld(dyp[i]) * wel[i] * sg - g0s;
        const float xh = ((ld(xp[i]) * s - piv) - md) * m;
        dxp[i] = to_t<T>(((gs - mg) - xh * mgx) * m2);
      }
    } else if (m != 0.f && m2 != 0.f) {
#pragma omp simd
      for (int64_t i = 0; i < L; ++i) {
        const float gs = ld(dyp[i]) * wc * sg - g0s;
        const float xh = ((ld(xp[i]) * s - piv) - md) * m;
        dxp[i] = to_t<T>(((gs - mg) - xh * mgx) * m2);
      }
    } else {
      for (int64_t i = 0; i < L; ++i) {
        const float gs = ld(dyp[i]) * (wel ? wel[i] : wc) * sg - g0s;
        const float xh = m != 0.f ? ((ld(xp[i]) * s - piv) - md) * m : h.slow(ld(xp[i]));
        dxp[i] = to_t<T>(pow2(((gs - mg) - xh * mgx) * st.r, q2));
      }
    }
  }
}

// _spec.normalize_backward over every group (backward_group); _spec.affine_backward's dweight, dbias summed
// per thread (rows: per element over the rows) or per (group, segment) (channel layouts), then per parameter
template <typename T>
void stats_backward_impl(const T* dy, const T* x, T* dx, const Stat* stats, const Shape& sh, const float* w, bool center,
                   bool need_dx, bool need_param, float* dw, float* db) {
  const int64_t G = sh.groups();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, sh.count()));
  if (sh.layout == kRows) {
    const int nt = at::get_num_threads();
    const int64_t D = sh.S;
    std::vector<float> part(need_param ? static_cast<size_t>(nt) * 2 * D : 0, 0.f);
    at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
      std::vector<float> inner(need_param ? 2 * D : 0, 0.f);  // a block of up to 64 rows, then flushed
      float* pw = need_param ? part.data() + static_cast<size_t>(at::get_thread_num()) * 2 * D : nullptr;
      int64_t in_block = 0;
      for (int64_t gi = g0; gi < g1; ++gi) {
        backward_group(dy, x, dx, sh, gi, stats[gi], w, center, need_dx, nullptr, nullptr,
                       need_param ? inner.data() : nullptr, need_param ? inner.data() + D : nullptr);
        if (need_param && (++in_block == 64 || gi + 1 == g1)) {
          for (int64_t i = 0; i < 2 * D; ++i) { pw[i] += inner[i]; inner[i] = 0.f; }
          in_block = 0;
        }
      }
    });
    if (need_param) {
      for (int64_t i = 0; i < D; ++i) {
        Acc aw, ab;
        for (int t = 0; t < nt; ++t) { aw.add(part[t * 2 * D + i]); ab.add(part[t * 2 * D + D + i]); }
        dw[i] = aw.s; db[i] = ab.s;
      }
    }
    return;
  }
  // channel layouts: per-(group, segment) sums, then reduced per channel
  const int64_t ns = sh.nseg();
  std::vector<float> segw(need_param ? G * ns : 0), segb(need_param ? G * ns : 0);
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t gi = g0; gi < g1; ++gi)
      backward_group(dy, x, dx, sh, gi, stats[gi], w, center, need_dx,
                     need_param ? segw.data() + gi * ns : nullptr, need_param ? segb.data() + gi * ns : nullptr,
                     nullptr, nullptr);
  });
  if (!need_param) return;
  if (sh.layout == kChannels) {
    for (int64_t c = 0; c < sh.C; ++c) {
      Acc aw, ab;
      for (int64_t j = 0; j < ns; ++j) { aw.add(segw[c * ns + j]); ab.add(segb[c * ns + j]); }
      dw[c] = aw.s; db[c] = ab.s;
    }
  } else {  // GROUPS: group gi = n * G + g, segment j is channel g * Cg + j
    for (int64_t c = 0; c < sh.C; ++c) {
      const int64_t g = c / sh.Cg, j = c % sh.Cg;
      Acc aw, ab;
      for (int64_t n = 0; n < sh.N; ++n) { aw.add(segw[(n * sh.G + g) * ns + j]); ab.add(segb[(n * sh.G + g) * ns + j]); }
      dw[c] = aw.s; db[c] = ab.s;
    }
  }
}

// ---- given statistics (batch / instance norm eval): _spec.affine_with_stats ----
// y = (x - mean) * (w * rstd) + b, with rstd = r * 2**k from inv_std(var, 0, eps) and w * rstd split as
// m * 2**q (Factor: _spec.eval_factor), applied by apply_split (_spec.apply_factor): neither x * rstd nor
// w * rstd is ever formed where it could overflow and y does not. x - mean is taken in halves where it
// overflows (_spec.centered).

template <typename T>
void eval_forward_impl(const T* x, T* y, const float* mean, const float* var, const float* w, const float* b,
                       double eps, int64_t N, int64_t C, int64_t S) {
  const std::vector<Factor> factors = channel_factors(w, var, C, eps);
  at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S)), [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t c = row % C;
      const float mu = mean[c], bc = b[c];
      const Factor& fa = factors[c];
      const T* xp = x + row * S;
      T* yp = y + row * S;
      float big = 0.f;  // max |x - mean|: inf when the difference overflowed somewhere
      if (fa.one) {
        const float f = fa.f;
#pragma omp simd reduction(max : big)
        for (int64_t i = 0; i < S; ++i) {
          const float diff = ld(xp[i]) - mu;
          big = std::max(big, std::abs(diff));
          store(yp, i, diff * f + bc);
        }
      } else {
        for (int64_t i = 0; i < S; ++i) {
          const float diff = ld(xp[i]) - mu;
          big = std::max(big, std::abs(diff));
          yp[i] = to_t<T>(apply_split(diff, fa.m, fa.q) + bc);
        }
      }
      if (big > FLT_MAX && std::isfinite(mu)) {  // x - mean left the range (opposite signs near the top): halves
        for (int64_t i = 0; i < S; ++i) {
          const float v = ld(xp[i]);
          if (std::isinf(v - mu) && std::isfinite(v)) yp[i] = to_t<T>(apply_split(v * 0.5f - mu * 0.5f, fa.m, fa.q + 1) + bc);
        }
      }
    }
  });
}

// _spec.affine_with_stats_backward: dx = dy * (w * rstd) (the split factor), dw = sum(dy * x_hat), db = sum(dy).
// dy * x_hat is summed as dy * ((x - mean) * rstd); a channel whose sum left the range is summed again as
// _spec.eval_dweight sums it (eval_dweight, rstd applied last).
template <typename T>
void eval_backward_impl(const T* dy, const T* x, T* dx, const float* mean, const float* var, const float* w, double eps,
                        int64_t N, int64_t C, int64_t S, bool need_dx, bool need_param, float* dw, float* db) {
  const std::vector<Factor> factors = channel_factors(w, var, C, eps);
  std::vector<float> segw(need_param ? N * C : 0), segb(need_param ? N * C : 0);
  at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S)), [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t c = row % C;
      const float mu = mean[c];
      const T* dyp = dy + row * S;
      const T* xp = x + row * S;
      const Factor& fa = factors[c];  // dx = dy * (w * rstd), the factor split as in forward
      const float rs = fa.rstd();
      T* dxp = need_dx ? dx + row * S : nullptr;
      if (need_dx && !fa.one) {
        for (int64_t i = 0; i < S; ++i) dxp[i] = to_t<T>(apply_split(ld(dyp[i]), fa.m, fa.q));
      }
      const bool fused_dx = need_dx && fa.one;
      const float f = fa.f;
      if (need_param) {  // one pass: dx (when a single factor) and sum(dy * x_hat), sum(dy)
        Acc aw, ab;
        for (int64_t i0 = 0; i0 < S; i0 += kChunk) {
          float o[2];
          auto term = [=](int64_t i, float& a, float& b) {
            const float d = ld(dyp[i]);
            const float xv = ld(xp[i]);
            const float diff = xv - mu;
            const float xh = std::abs(diff) > FLT_MAX ? ((xv * 0.5f - mu * 0.5f) * rs) * 2.f : diff * rs;
            a = d * xh; b = d;
          };
          if (fused_dx) {
            lane_sum2(i0, std::min(S, i0 + kChunk), [=](int64_t i, float& a, float& b) {
              term(i, a, b);
              dxp[i] = to_t<T>(ld(dyp[i]) * f);
            }, o[0], o[1]);
          } else {
            lane_sum2(i0, std::min(S, i0 + kChunk), term, o[0], o[1]);
          }
          aw.add(o[0]); ab.add(o[1]);
        }
        segw[row] = aw.s; segb[row] = ab.s;
      } else if (fused_dx) {
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) dxp[i] = to_t<T>(ld(dyp[i]) * f);
      }
    }
  });
  if (need_param) {
    for (int64_t c = 0; c < C; ++c) {
      Acc aw, ab;
      for (int64_t n = 0; n < N; ++n) { aw.add(segw[n * C + c]); ab.add(segb[n * C + c]); }
      dw[c] = aw.s; db[c] = ab.s;
      if (!std::isfinite(dw[c])) {  // x_hat or a product left the range: rstd applied last
        dw[c] = eval_dweight(N * S, [&](int64_t i, float& d, float& xv) {
          const int64_t at = ((i / S) * C + c) * S + i % S;
          d = ld(dy[at]); xv = ld(x[at]);
        }, mean[c], factors[c]);
      }
    }
  }
}

Shape make_shape(const torch::Tensor& x, int64_t layout, int64_t groups, int64_t C, const char* op) {
  TORCH_CHECK(layout == kRows || layout == kGroups || layout == kChannels, op,
              ": layout must be 0 (rows), 1 (groups) or 2 (channels), got ", layout, " (3, channels last: the _cl entry points)");
  check_input(x, layout == kRows ? 1 : 2, op);
  const Extent ex = extent(x, layout, C, op);
  Shape sh{layout, ex.N, ex.C, ex.S, 1, 1};
  if (layout == kGroups) {
    TORCH_CHECK(groups >= 1 && C % groups == 0, op, ": groups=", groups, " must divide C=", C);
    sh.G = groups; sh.Cg = C / groups;
  }
  return sh;
}

// Forward with statistics of x: layout 0 rows (R, D = C), 1 groups, 2 channels (x (N, C, *) read as (N, C, S)); x
// contiguous, of any shape the layout reads. weight, bias: float32, C values. Returns (y (x's sizes), stats (groups, 8));
// with output false, the statistics alone (y undefined; weight and bias unread).
std::tuple<torch::Tensor, torch::Tensor> stats_forward(const torch::Tensor& x, const torch::Tensor& weight,
                                                       const torch::Tensor& bias, int64_t layout, int64_t groups,
                                                       int64_t C, double eps, bool center, bool output) {
  const Shape sh = make_shape(x, layout, groups, C, "stats_forward");
  if (output) {
    check_param(weight, C, "stats_forward: weight");
    check_param(bias, C, "stats_forward: bias");
  }
  torch::Tensor y = output ? torch::empty(x.sizes(), x.options()) : torch::Tensor();
  auto stats = torch::empty({sh.groups(), 8}, x.options().dtype(at::kFloat));
  dispatch_dtype(x, "stats_forward", [&](auto tag) {
    using T = decltype(tag);
    stats_forward_impl<T>(x.data_ptr<T>(), output ? y.data_ptr<T>() : nullptr,
                          reinterpret_cast<Stat*>(stats.data_ptr<float>()), sh, output ? weight.data_ptr<float>() : nullptr,
                          output ? bias.data_ptr<float>() : nullptr, eps, center);
  });
  return {y, stats};
}

// Backward of stats_forward. Returns (dx or empty, dweight (float32, C) or empty, dbias (float32, C) or empty).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> stats_backward(
    const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& stats,
    int64_t layout, int64_t groups, int64_t C, bool center, bool need_dx, bool need_param) {
  const Shape sh = make_shape(x, layout, groups, C, "stats_backward");
  check_grad(dy, x, "stats_backward");
  check_param(weight, C, "stats_backward: weight");
  check_stats(stats, sh.groups(), "stats_backward");
  torch::Tensor dx, dw, db;  // not a structured binding: the lambda below captures them (C++17)
  std::tie(dx, dw, db) = grad_buffers(x, C, need_dx, need_param);
  dispatch_dtype(x, "stats_backward", [&](auto tag) {
    using T = decltype(tag);
    stats_backward_impl<T>(dy.data_ptr<T>(), x.data_ptr<T>(), need_dx ? dx.data_ptr<T>() : nullptr,
                     reinterpret_cast<const Stat*>(stats.data_ptr<float>()), sh, weight.data_ptr<float>(), center,
                     need_dx, need_param, need_param ? dw.data_ptr<float>() : nullptr,
                     need_param ? db.data_ptr<float>() : nullptr);
  });
  return {dx, dw, db};
}

// y = (x - mean) * rsqrt(var + eps) * weight + bias per channel of x (N, C, *) (contiguous, read as (N, C, S));
// mean, var, weight, bias float32, C values.
torch::Tensor eval_forward(const torch::Tensor& x, const torch::Tensor& mean, const torch::Tensor& var,
                           const torch::Tensor& weight, const torch::Tensor& bias, double eps) {
  check_input(x, 2, "eval_forward");
  const Extent ex = extent(x, kChannels, x.size(1), "eval_forward");
  const int64_t N = ex.N, C = ex.C, S = ex.S;
  check_param(mean, C, "eval_forward: mean"); check_param(var, C, "eval_forward: var");
  check_param(weight, C, "eval_forward: weight"); check_param(bias, C, "eval_forward: bias");
  auto y = torch::empty(x.sizes(), x.options());
  dispatch_dtype(x, "eval_forward", [&](auto tag) {
    using T = decltype(tag);
    eval_forward_impl<T>(x.data_ptr<T>(), y.data_ptr<T>(), mean.data_ptr<float>(), var.data_ptr<float>(),
                         weight.data_ptr<float>(), bias.data_ptr<float>(), eps, N, C, S);
  });
  return y;
}

// Backward of eval_forward: (dx or empty, dweight or empty, dbias or empty), parameter grads in float32.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> eval_backward(
    const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& mean, const torch::Tensor& var,
    const torch::Tensor& weight, double eps, bool need_dx, bool need_param) {
  check_input(x, 2, "eval_backward");
  check_grad(dy, x, "eval_backward");
  const Extent ex = extent(x, kChannels, x.size(1), "eval_backward");
  const int64_t N = ex.N, C = ex.C, S = ex.S;
  check_param(mean, C, "eval_backward: mean"); check_param(var, C, "eval_backward: var");
  check_param(weight, C, "eval_backward: weight");
  torch::Tensor dx, dw, db;  // not a structured binding: the lambda below captures them (C++17)
  std::tie(dx, dw, db) = grad_buffers(x, C, need_dx, need_param);
  dispatch_dtype(x, "eval_backward", [&](auto tag) {
    using T = decltype(tag);
    eval_backward_impl<T>(dy.data_ptr<T>(), x.data_ptr<T>(), need_dx ? dx.data_ptr<T>() : nullptr, mean.data_ptr<float>(),
                          var.data_ptr<float>(), weight.data_ptr<float>(), eps, N, C, S, need_dx, need_param,
                          need_param ? dw.data_ptr<float>() : nullptr, need_param ? db.data_ptr<float>() : nullptr);
  });
  return {dx, dw, db};
}

}  // namespace nk_norm
