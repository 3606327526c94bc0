// Channels-last CPU kernels for batch norm (train and eval), group norm and instance norm. A channels_last
// (N, C, *spatial) tensor is a contiguous (N, S, C) array -- x.permute(0, 2, 3, 1), or (0, 2, 3, 4, 1) for
// channels_last_3d -- so the channels of one spatial position are adjacent: every loop below runs over rows
// of C values and is vectorized across channels, with no copy to (N, C, S). They implement the same functions
// of normkit/_spec.py as norm_kernel.cpp, each step below naming the one it implements.
//
// Statistics of x (normkit::stats_norm layout 3, GROUPS_CL): x (N, S, C), a group per (n, g) = the S rows of
// sample n times Cg = C / G consecutive channels; weight, bias per channel. Group norm (and instance norm,
// Cg = 1) as they come; batch norm in training as one sample of N * S rows with G = C. Group by group, as
// norm_kernel.cpp: one pass for max|x|, sum(d), sum(d^2) with d = x - pivot, the pivot being the group's first
// element x[n, 0, g * Cg]; _spec.plain_moments where its conditions hold, else _spec.moments (scale by 2**-e,
// shift, two more passes); the same 8 floats of Stat per group, so backward and the eager double backward
// read them unchanged. Backward keeps only x and the statistics and recomputes x_hat (_spec.grad_sums, then
// _spec.standardize_backward_from_sums; _spec.affine_backward's parameter sums in the same pass).
//
// Column sums: each channel's sum runs in a register lane over a block of kBlock rows (tiles of 64, 32 or 16
// channels as 16-lane vectors, the last C % 16 channels one at a time) and each block's total is added to the
// channel's Kahan sum. Rows are cut into chunks (about 2**17 values; a function of S and C only, so results
// do not depend on the thread count) whose totals are added in order with Kahan compensation, then a group's
// Cg channel totals the same way: a channel of 10^5 values sums about as accurately as in norm_kernel.cpp.
// Rows of one tile (C = 16, 32, 64) stream through with the tile's constants in registers; wider rows are
// read a row (elementwise) or 8 rows (sums) at a time across all their tiles, so memory is still read in
// order. Work runs per sample (its later passes then reread it from cache) when there are at least two samples
// per thread, else per (sample, chunk). On AVX-512 builds, outputs of 16 MiB and more are written with
// non-temporal stores (put_stream, streaming).
//
// Given statistics (eval; x (R, C), R = N * S): _spec.affine_with_stats as eval_forward_impl of norm_kernel.cpp,
// y = (x - mean_c) * (w_c * rstd_c) + b_c with w * rstd split as Factor / apply_split (no intermediate
// overflow) and x - mean halved where it overflows; backward _spec.affine_with_stats_backward, dx = dy *
// (w * rstd), dw_c = sum(dy * x_hat) (split products where that sum leaves the range), db_c = sum(dy).
//
// Channels that need per-element ldexp (a multiplier outside the normal range: x_hat's, dx's, or eval's
// split factor, or an eval mean near the top of float32) take a scalar path, one channel at a time.
// float32, bfloat16 and float16 are read and written in their own type and computed in float32.

#include "norm_common.h"

#include <array>
#include <functional>
#include <numeric>

namespace nk_cl {

using namespace nk_norm;

constexpr int64_t kBlock = 64;  // rows summed in registers before a compensated add

// One element (Vt = float) or 16 lanes (Vt = V) of T at p
template <typename Vt, typename T>
inline Vt load(const T* p) {
  if constexpr (std::is_same<Vt, float>::value) return ld(*p);
  else return vload(p);
}
template <typename T>
inline void put(T* p, float v) { store(p, 0, v); }
template <typename T>
inline void put(T* p, V v) { vstore(p, v); }
// Non-temporal stores of 16 lanes (p aligned to their size): a large output goes to memory without first being
// read into cache (the write-allocate read is a third of an elementwise pass's traffic). Elsewhere put().
template <typename T>
inline void put_stream(T* p, float v) { store(p, 0, v); }
template <typename T>
inline void put_stream(T* p, V v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    _mm512_stream_ps(p, (__m512)v);
  } else {
    alignas(32) T h[kLanes16];
    vstore(h, v);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm256_load_si256(reinterpret_cast<const __m256i*>(h)));
  }
#else
  vstore(p, v);
#endif
}

// Whether the output y of (rows, C) is written with non-temporal stores: AVX-512, every 16-lane store aligned
// (C a multiple of 16 and y 64-byte aligned), and large enough (16 MiB, with an input as large: a typical L3)
// that it would not stay in cache anyway. Measured at (32, 64, 56, 56): float32 (25.7 MB) passes 20-30%
// faster streamed, bfloat16 (12.8 MB) 5-10% slower. Not on AVX2: on the 2-core AMD EPYC (AVX2, 32 MiB L3) the
// same float32 forwards were slower streamed (_mm256_stream_ps), 2 runs each: batch norm eval 3.7-3.9 against
// 2.2-2.5 ms, group norm 6.3-6.4 against 5.0-5.2 ms, batch norm train 6.4-6.6 against 5.2-5.5 ms.
template <typename T>
inline bool streaming(const T* y, int64_t C, int64_t numel) {
#if defined(__AVX512F__)
  return y && C % kLanes16 == 0 && reinterpret_cast<uintptr_t>(y) % 64 == 0 &&
         numel * static_cast<int64_t>(sizeof(T)) >= (int64_t(16) << 20);
#else
  (void)y; (void)C; (void)numel;
  return false;
#endif
}

inline float vabs(float v) { return std::abs(v); }
inline V vabs(V v) { return (V)((VU)v & 0x7FFFFFFFu); }
inline float vmax(float a, float b) { return std::max(a, b); }
// std::max's choice per lane (NaN in b is dropped): a < b ? b : a, on 8-lane halves without AVX-512 (see V)
inline V vmax(V a, V b) {
#if defined(__AVX512F__)
  return a < b ? b : a;
#else
  typedef float V8 __attribute__((vector_size(32)));
  V8 x[2], y[2];
  std::memcpy(x, &a, sizeof(V));
  std::memcpy(y, &b, sizeof(V));
  for (int i = 0; i < 2; ++i) x[i] = x[i] < y[i] ? y[i] : x[i];
  std::memcpy(&a, x, sizeof(V));
  return a;
#endif
}

// What a pass's element function f(t, r, c, k, j, ...) computes on: Vt lanes (float or V) of channels c..,
// with S the scalar slow branch (per-element ldexp and the like; only with Vt = float)
template <typename Vt, bool S>
struct Lane {
  using type = Vt;
  static constexpr bool slow = S;
};
template <typename L> using lane_t = typename L::type;

// The per-channel constants of a tile: k[i][j] is constant i for lane j (one channel or 16 of them) --
// a copy next to the loop, held in registers over long blocks of rows, or (short blocks) loads from the arrays.
template <typename Vt, int NC, int U, bool Copy>
struct Consts {
  Vt k[NC][U];
  Consts(const float* const* cs, int64_t c0) {
    for (int i = 0; i < NC; ++i)
      for (int u = 0; u < U; ++u) k[i][u] = load<Vt>(cs[i] + c0 + u * int64_t(sizeof(Vt) / sizeof(float)));
  }
};
template <typename Vt, int NC, int U>
struct Consts<Vt, NC, U, false> {
  struct Row {
    const float* p;
    Vt operator[](int u) const { return load<Vt>(p + u * int64_t(sizeof(Vt) / sizeof(float))); }
  };
  struct View {
    const float* p[NC];  // the arrays' addresses at c0, held locally (not reloaded after each store)
    Row operator[](int i) const { return Row{p[i]}; }
  } k;
  Consts(const float* const* cs, int64_t c0) {
    for (int i = 0; i < NC; ++i) k.p[i] = cs[i] + c0;
  }
};

// Rows [r0, r1), U lane groups of channels from c0 (U vectors of 16 channels, or one channel with Vt =
// float). Per lane group f(t, i, k, j, m, v1, .., v4, o), i = r * C + c the flat index, gives (with Mx) a value
// m >= 0 whose max is kept, K summands and (with Out) the output y[i ..] = o. Each channel's running max and
// sums, pm[c] and ps[i * C + c], are held in registers over the rows.
template <typename Vt, int U, int NC, int K, bool Mx, bool Out, bool S, bool Copy, typename T, typename F>
inline void reduce_tile(int64_t r0, int64_t r1, int64_t c0, int64_t C, const float* const* cs, F& f, float* pm,
                        float* ps, T* y, bool nt) {
  constexpr int64_t L = sizeof(Vt) / sizeof(float);
  const Consts<Vt, NC, U, Copy> kc(cs, c0);
  Vt am[U], a1[U], a2[U], a3[U], a4[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    const int64_t c = c0 + u * L;
    if constexpr (Mx) am[u] = load<Vt>(pm + c);
    if constexpr (K >= 1) a1[u] = load<Vt>(ps + c);
    if constexpr (K >= 2) a2[u] = load<Vt>(ps + C + c);
    if constexpr (K >= 3) a3[u] = load<Vt>(ps + 2 * C + c);
    if constexpr (K >= 4) a4[u] = load<Vt>(ps + 3 * C + c);
  }
  for (int64_t r = r0; r < r1; ++r) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + u * L;
      Vt m{}, v1{}, v2{}, v3{}, v4{}, o{};
      f(Lane<Vt, S>(), r * C + c, kc.k, u, m, v1, v2, v3, v4, o);
      if constexpr (Mx) am[u] = vmax(am[u], m);
      if constexpr (K >= 1) a1[u] += v1;
      if constexpr (K >= 2) a2[u] += v2;
      if constexpr (K >= 3) a3[u] += v3;
      if constexpr (K >= 4) a4[u] += v4;
      if constexpr (Out) {
        if (nt) put_stream(y + r * C + c, o);
        else put(y + r * C + c, o);
      }
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    const int64_t c = c0 + u * L;
    if constexpr (Mx) put(pm + c, am[u]);
    if constexpr (K >= 1) put(ps + c, a1[u]);
    if constexpr (K >= 2) put(ps + C + c, a2[u]);
    if constexpr (K >= 3) put(ps + 2 * C + c, a3[u]);
    if constexpr (K >= 4) put(ps + 3 * C + c, a4[u]);
  }
}

// A block's maxima into mx and its sums into the Kahan accumulators, which restart from 0
__attribute__((noinline)) inline void flush_block(int64_t C, int K, bool mx_too, const float* pm, float* ps, float* mx,
                                                  Acc* acc) {
  if (mx_too)
    for (int64_t c = 0; c < C; ++c) mx[c] = std::max(mx[c], pm[c]);
  for (int64_t i = 0; i < K * C; ++i) {
    acc[i].add(ps[i]);
    ps[i] = 0.f;
  }
}

// reduce_tile over rows [r0, r1) of every channel, in tiles of 64, 32 and 16 channels; the last C % 16
// channels, and every channel flagged in slow (may be null), one at a time (the flagged ones through f's
// scalar slow branch). Each channel's sum over a block of kBlock rows is added to its Kahan accumulator
// acc[i * C + c], its max to mx[c]. A row that is one tile (C = 16, 32, 64) streams through with the tile's
// constants and sums in registers; wider rows are read one row (elementwise) or 8 rows (sums) at a time across
// all their tiles, so that memory is still read in order (tile by tile over long blocks, a strided pattern,
// took twice the time).
template <int NC, int K, bool Mx, bool Out, typename T, typename F>
void reduce_rows_tiled(int64_t r0, int64_t r1, int64_t C, const float* const* cs, const uint8_t* slow, F& f,
                       float* mx, Acc* acc, T* y, bool nt) {
  const bool one_tile = C == 64 || C == 32 || C == 16;
  // an elementwise pass has no sums to flush, and reads wide rows one at a time; sums over wide rows are held
  // over 8 rows between their loads and stores
  const int64_t block = K > 0 ? kBlock : (one_tile ? r1 - r0 : 1);
  const int64_t sub = one_tile ? block : (K > 0 ? 8 : 1);
  std::vector<float> part(static_cast<size_t>((K + 1) * C), 0.f);
  float* pm = part.data();
  float* ps = part.data() + C;
  // the tiles: (first channel, vectors: 4, 2, 1, or 0 for one scalar channel); a vector tile holding a slow
  // channel is run channel by channel
  std::vector<std::pair<int64_t, int>> tiles;
  {
    auto any_slow = [&](int64_t c0, int64_t w) {
      for (int64_t c = c0; slow && c < c0 + w; ++c) if (slow[c]) return true;
      return false;
    };
    int64_t c0 = 0;
    auto add = [&](int u) {
      if (any_slow(c0, u * kLanes16)) for (int64_t c = c0; c < c0 + u * kLanes16; ++c) tiles.emplace_back(c, 0);
      else tiles.emplace_back(c0, u);
      c0 += u * kLanes16;
    };
    while (c0 + 64 <= C) add(4);
    if (c0 + 32 <= C) add(2);
    if (c0 + 16 <= C) add(1);
    for (; c0 < C; ++c0) tiles.emplace_back(c0, 0);
  }
  auto run = [&](auto copy, int64_t s0, int64_t s1) {
    constexpr bool Copy = decltype(copy)::value;
    for (const auto& [c0, u] : tiles) {
      if (u == 4) reduce_tile<V, 4, NC, K, Mx, Out, false, Copy>(s0, s1, c0, C, cs, f, pm, ps, y, nt);
      else if (u == 2) reduce_tile<V, 2, NC, K, Mx, Out, false, Copy>(s0, s1, c0, C, cs, f, pm, ps, y, nt);
      else if (u == 1) reduce_tile<V, 1, NC, K, Mx, Out, false, Copy>(s0, s1, c0, C, cs, f, pm, ps, y, nt);
      else if (slow && slow[c0]) reduce_tile<float, 1, NC, K, Mx, Out, true, false>(s0, s1, c0, C, cs, f, pm, ps, y, nt);
      else reduce_tile<float, 1, NC, K, Mx, Out, false, false>(s0, s1, c0, C, cs, f, pm, ps, y, nt);
    }
  };
  for (int64_t b0 = r0; b0 < r1; b0 += block) {
    const int64_t b1 = std::min(r1, b0 + block);
    for (int64_t s0 = b0; s0 < b1; s0 += sub) {
      if (one_tile) run(std::true_type(), s0, std::min(b1, s0 + sub));
      else run(std::false_type(), s0, std::min(b1, s0 + sub));
    }
    if constexpr (K >= 1) flush_block(C, K, Mx, pm, ps, mx, acc);
  }
#if defined(__AVX512F__)
  if (nt) _mm_sfence();  // the streamed stores are visible before another thread reads them
#endif
}

// reduce_rows_tiled, with fewer than 16 channels widened first: q = 16 / gcd(C, 16) consecutive rows are one
// row of L = q * C channels (a multiple of 16: vector tiles only) whose constants repeat every C lanes; lane
// c' stands for channel c' % C, and its sums and max are folded into that channel's. Leftover rows (fewer
// than q) and slow channels run on the C-wide rows.
template <int NC, int K, bool Mx, bool Out, typename T, typename F>
void reduce_rows(int64_t r0, int64_t r1, int64_t C, const float* const* cs, const uint8_t* slow, F f, float* mx,
                 Acc* acc, T* y, bool nt) {
  const int64_t q = kLanes16 / std::gcd<int64_t>(C, kLanes16);
  bool any_slow = false;
  for (int64_t c = 0; slow && c < C; ++c) any_slow = any_slow || slow[c];
  if (C >= kLanes16 || q == 1 || any_slow || r0 % q != 0 || r1 - r0 < q) {
    reduce_rows_tiled<NC, K, Mx, Out>(r0, r1, C, cs, slow, f, mx, acc, y, nt);
    return;
  }
  const int64_t L = q * C, rw = (r1 - r0) / q * q;
  std::vector<float> wide(static_cast<size_t>(NC * L));
  const float* wcs[NC > 0 ? NC : 1];
  for (int i = 0; i < NC; ++i) {
    for (int64_t c = 0; c < L; ++c) wide[i * L + c] = cs[i][c % C];
    wcs[i] = wide.data() + i * L;
  }
  std::vector<float> wmx(static_cast<size_t>(L), 0.f);
  std::vector<Acc> wacc(static_cast<size_t>(K * L));
  reduce_rows_tiled<NC, K, Mx, Out>(r0 / q, r0 / q + rw / q, L, wcs, nullptr, f, wmx.data(), wacc.data(), y,
                                    nt && L % kLanes16 == 0);
  if constexpr (K >= 1) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t w = c; w < L; w += C) {
        if constexpr (Mx) mx[c] = std::max(mx[c], wmx[w]);
        for (int i = 0; i < K; ++i) acc[i * C + c].add(wacc[i * L + w].s);
      }
    }
  }
  if (rw < r1 - r0) reduce_rows_tiled<NC, K, Mx, Out>(r0 + rw, r1, C, cs, slow, f, mx, acc, y, false);
}

// One chunk's column totals: tot[c] the max (0 without Mx), tot[(i + 1) * C + c] sum i (and y, with Out)
template <int NC, int K, bool Mx, bool Out = false, typename T = float, typename F>
void chunk_totals(int64_t r0, int64_t r1, int64_t C, const float* const* cs, const uint8_t* slow, F f, float* tot,
                  T* y = nullptr, bool nt = false) {
  std::vector<Acc> acc(K * C);
  std::fill(tot, tot + C, 0.f);
  reduce_rows<NC, K, Mx, Out>(r0, r1, C, cs, slow, f, tot, acc.data(), y, nt);
  for (int i = 0; i < K; ++i)
    for (int64_t c = 0; c < C; ++c) tot[(i + 1) * C + c] = acc[i * C + c].s;
}

// An elementwise pass: y[i] = f(t, i, k, j) over rows [r0, r1) (i = r * C + c)
template <int NC, typename T, typename F>
void map_rows(int64_t r0, int64_t r1, int64_t C, const float* const* cs, const uint8_t* slow, F f, T* y, bool nt) {
  auto g = [&f](auto t, int64_t i, const auto& k, int j, auto&, auto&, auto&, auto&, auto&, auto& o) {
    o = f(t, i, k, j);
  };
  reduce_rows<NC, 0, false, true>(r0, r1, C, cs, slow, g, nullptr, nullptr, y, nt);
}

// The totals of one sample's nch chunks (chunk_totals', `stride` floats apart) added in chunk order, into tot
inline void combine_chunks(const float* part, int64_t stride, int64_t nch, int K, int64_t C, float* tot) {
  for (int64_t c = 0; c < C; ++c) {
    float m = 0.f;
    for (int64_t ch = 0; ch < nch; ++ch) m = std::max(m, part[ch * stride + c]);
    tot[c] = m;
  }
  for (int i = 1; i <= K; ++i)
    for (int64_t c = 0; c < C; ++c) {
      Acc a;
      for (int64_t ch = 0; ch < nch; ++ch) a.add(part[ch * stride + i * C + c]);
      tot[i * C + c] = a.s;
    }
}

// Over a group's channels [c0, c0 + cg) of one row of totals: the compensated sum and the max
inline float group_sum(const float* t, int64_t c0, int64_t cg) {
  Acc a;
  for (int64_t c = c0; c < c0 + cg; ++c) a.add(t[c]);
  return a.s;
}
inline float group_max(const float* t, int64_t c0, int64_t cg) {
  float m = 0.f;
  for (int64_t c = c0; c < c0 + cg; ++c) m = std::max(m, t[c]);
  return m;
}

// x (N, S, C), G groups of Cg channels; rows cut into nch chunks of `rows` rows (about 2**17 values each)
struct Geo {
  int64_t N, S, C, G, Cg, rows, nch;
  Geo(int64_t n, int64_t s, int64_t c, int64_t g) : N(n), S(s), C(c), G(g), Cg(c / g) {
    const int64_t want = (int64_t(1) << 17) / std::max<int64_t>(C, 1) / kBlock * kBlock;
    rows = std::min<int64_t>(kChunk, std::max<int64_t>(kBlock, want));
    nch = std::max<int64_t>(1, (S + rows - 1) / rows);
  }
  int64_t r0(int64_t ch) const { return ch * rows; }
  int64_t r1(int64_t ch) const { return std::min(S, (ch + 1) * rows); }
};

// A step of a kernel: per chunk f(n, ch) or per sample f(n, 0); for the samples where active(n) (all if none)
struct Step {
  bool per_chunk;
  std::function<void(int64_t, int64_t)> f;
  std::function<bool(int64_t)> active = nullptr;
};

// Runs the steps in order for every sample: a whole sample on one thread when there are at least two samples
// per thread (its later passes then find its data in cache), else step by step, parallel over (sample, chunk).
// Either way every sum is taken in the same order.
inline void run_steps(const Geo& g, const std::vector<Step>& steps) {
  if (g.N >= 2 * at::get_num_threads()) {
    at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (const Step& s : steps)
          if (!s.active || s.active(n))
            for (int64_t ch = 0; ch < (s.per_chunk ? g.nch : 1); ++ch) s.f(n, ch);
    });
    return;
  }
  for (const Step& s : steps) {
    bool any = !s.active;
    for (int64_t n = 0; n < g.N && !any; ++n) any = s.active(n);
    if (!any) continue;  // no parallel region for a step with nothing to do (the robust passes, mostly)
    const int64_t per = s.per_chunk ? g.nch : 1;
    at::parallel_for(0, g.N * per, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        if (!s.active || s.active(i / per)) s.f(i / per, i % per);
    });
  }
}

// x_hat of element v of channel k[.][j], constants (s, piv, mean_d, m, r, q) from index X on
template <int X, bool S, typename Vt, typename K>
inline Vt x_hat(Vt v, const K& k, int j) {
  const Vt d = (v * k[X][j] - k[X + 1][j]) - k[X + 2][j];
  if constexpr (S) {
    return k[X + 3][j] != 0.f ? d * k[X + 3][j] : pow2(d * k[X + 4][j], static_cast<int>(k[X + 5][j]));
  } else {
    return d * k[X + 3][j];
  }
}

// Per-channel x_hat constants of a sample from its groups' statistics: s, piv, mean_d, m, r, q; slow where m is 0
inline void xhat_consts(const Stat* st, const Geo& g, float* const* out, uint8_t* slow) {
  for (int64_t c = 0; c < g.C; ++c) {
    const XHat h(st[c / g.Cg]);
    out[0][c] = h.s; out[1][c] = h.piv; out[2][c] = h.mean_d; out[3][c] = h.m; out[4][c] = h.r;
    out[5][c] = static_cast<float>(h.q);
    slow[c] = h.m == 0.f;
  }
}

// A set of per-sample, per-channel float arrays: a(i, n) is array i of sample n (C floats)
struct Planes {
  int64_t C, N;
  std::vector<float> v;
  Planes(int64_t count, int64_t n, int64_t c) : C(c), N(n), v(static_cast<size_t>(count * n * c), 0.f) {}
  float* a(int64_t i, int64_t n) { return v.data() + (i * N + n) * C; }
};

// _spec.standardize + _spec.affine per group of channels-last rows (the steps below, in order)
template <typename T>
void forward_impl(const T* x, T* y, Stat* stats, const Geo& g, const float* w, const float* b, double eps, bool center) {
  const int64_t N = g.N, S = g.S, C = g.C, G = g.G, Cg = g.Cg, nch = g.nch;
  const Eps eps_split(eps);
  const float count = static_cast<float>(S * Cg);
  // per sample and channel: 0 pivot (first pass), 1 scale, 2 pivot, 3 mean_d (robust passes), 4..9 x_hat
  Planes pl(10, N, C);
  std::vector<float> part(static_cast<size_t>(N * nch * 3 * C));
  std::vector<uint8_t> slow(N * C), robust(N * G), any_robust(N);
  std::vector<int> ex(N * G, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) pl.a(0, n)[c] = center ? ld(x[n * S * C + (c / Cg) * Cg]) : 0.f;
  auto xs = [&](int64_t n) { return x + n * S * C; };
  auto chunk_part = [&](int64_t n, int64_t ch) { return part.data() + (n * nch + ch) * 3 * C; };

  // _spec.plain_moments' one pass: max |x|, sum(d), sum(d^2) with d = x - pivot
  auto moments = [&](int64_t n, int64_t ch) {
    const T* xp = xs(n);
    const float* cs[1] = {pl.a(0, n)};
    chunk_totals<1, 2, true>(g.r0(ch), g.r1(ch), C, cs, nullptr,
        [xp](auto t, int64_t i, const auto& k, int j, auto& m, auto& v1, auto& v2, auto&, auto&, auto&) {
          const auto v = load<lane_t<decltype(t)>>(xp + i);
          const auto d = v - k[0][j];
          m = vabs(v); v1 = d; v2 = d * d;
        }, chunk_part(n, ch));
  };
  // plain groups are done (_spec.plain_moments, then _spec.standardize_from_moments' make_stat); the others get
  // _spec.moments' scale and pivot
  auto decide = [&](int64_t n, int64_t) {
    std::vector<float> tot(3 * C);
    combine_chunks(chunk_part(n, 0), 3 * C, nch, 2, C, tot.data());
    for (int64_t gi = 0; gi < G; ++gi) {
      const int64_t c0 = gi * Cg;
      const float amax = group_max(tot.data(), c0, Cg), piv0 = pl.a(0, n)[c0];
      float mean_d, m2;
      float sc = 1.f, piv = piv0;
      if (plain_moments(amax, group_sum(tot.data() + C, c0, Cg), group_sum(tot.data() + 2 * C, c0, Cg),
                        S * Cg, center, mean_d, m2)) {
        stats[n * G + gi] = make_stat(m2, mean_d, piv0, 0, count, eps_split, center);
      } else {
        robust_scale(amax, piv0, center, ex[n * G + gi], sc, piv);
        robust[n * G + gi] = any_robust[n] = 1;
      }
      for (int64_t c = c0; c < c0 + Cg; ++c) { pl.a(1, n)[c] = sc; pl.a(2, n)[c] = piv; pl.a(3, n)[c] = 0.f; }
    }
  };
  // _spec.moments' two passes: sum(x * s - piv), then sum((x * s - piv - mean_d)^2)
  auto robust_pass = [&](int64_t n, int64_t ch, bool second) {
    if (!any_robust[n]) return;
    const T* xp = xs(n);
    const float* cs[3] = {pl.a(1, n), pl.a(2, n), pl.a(3, n)};
    chunk_totals<3, 1, false>(g.r0(ch), g.r1(ch), C, cs, nullptr,
        [xp, second](auto t, int64_t i, const auto& k, int j, auto&, auto& v1, auto&, auto&, auto&, auto&) {
          const auto d = load<lane_t<decltype(t)>>(xp + i) * k[0][j] - k[1][j];
          v1 = second ? (d - k[2][j]) * (d - k[2][j]) : d;
        }, chunk_part(n, ch));
  };
  auto robust_finish = [&](int64_t n, bool second) {
    if (!any_robust[n]) return;
    std::vector<float> tot(2 * C);
    combine_chunks(chunk_part(n, 0), 3 * C, nch, 1, C, tot.data());
    for (int64_t gi = 0; gi < G; ++gi) {
      if (!robust[n * G + gi]) continue;
      const int64_t c0 = gi * Cg;
      const float sum = group_sum(tot.data() + C, c0, Cg);
      if (!second) {
        const float mean_d = center ? sum / count : 0.f;
        for (int64_t c = c0; c < c0 + Cg; ++c) pl.a(3, n)[c] = mean_d;
      } else {
        stats[n * G + gi] = make_stat(sum, pl.a(3, n)[c0], pl.a(2, n)[c0], ex[n * G + gi], count, eps_split, center);
      }
    }
  };
  const bool nt = y != nullptr && streaming(y, C, N * S * C);
  auto output_consts = [&](int64_t n, int64_t) {
    float* out[6] = {pl.a(4, n), pl.a(5, n), pl.a(6, n), pl.a(7, n), pl.a(8, n), pl.a(9, n)};
    xhat_consts(stats + n * G, g, out, slow.data() + n * C);
  };
  // _spec.affine of _spec.standardize_from_moments' x_hat
  auto output = [&](int64_t n, int64_t ch) {
    const T* xp = xs(n);
    const float* cs[8] = {pl.a(4, n), pl.a(5, n), pl.a(6, n), pl.a(7, n), pl.a(8, n), pl.a(9, n), w, b};
    map_rows<8>(g.r0(ch), g.r1(ch), C, cs, slow.data() + n * C,
        [xp](auto t, int64_t i, const auto& k, int j) {
          return x_hat<0, decltype(t)::slow>(load<lane_t<decltype(t)>>(xp + i), k, j) * k[6][j] + k[7][j];
        }, y + n * S * C, nt);
  };
  auto robust_sample = [&](int64_t n) { return any_robust[n] != 0; };
  std::vector<Step> steps{{true, moments}, {false, decide},
                          {true, [&](int64_t n, int64_t ch) { robust_pass(n, ch, false); }, robust_sample},
                          {false, [&](int64_t n, int64_t) { robust_finish(n, false); }, robust_sample},
                          {true, [&](int64_t n, int64_t ch) { robust_pass(n, ch, true); }, robust_sample},
                          {false, [&](int64_t n, int64_t) { robust_finish(n, true); }, robust_sample}};
  if (y != nullptr) {  // (null: the statistics alone)
    steps.push_back({false, output_consts});
    steps.push_back({true, output});
  }
  run_steps(g, steps);
}

// _spec.normalize_backward per group of channels-last rows (the steps below, in order)
template <typename T>
void backward_impl(const T* dy, const T* x, T* dx, const Stat* stats, const Geo& g, const float* w, bool center,
                   bool need_dx, bool need_param, float* dw, float* db) {
  const int64_t N = g.N, S = g.S, C = g.C, G = g.G, Cg = g.Cg, nch = g.nch;
  const float count = static_cast<float>(S * Cg);
  // per sample and channel: 0..5 x_hat (s, piv, mean_d, m, r, q), 6 g0 (g's first value in the group), 7 sg
  // (2**-eg), 8 g0 * sg, 9 mean(gs), 10 mean(gs * x_hat), 11 dx multiplier m2, 12 its exponent q2, 13 dw, 14 db
  Planes pl(15, N, C);
  std::vector<float> part(static_cast<size_t>(N * nch * 5 * C)), gsum(2 * N * G);
  std::vector<uint8_t> slow_x(N * C), slow_dx(N * C), robust(N * G), any_robust(N);
  std::vector<int> eg(N * G, 0);
  auto chunk_part = [&](int64_t n, int64_t ch) { return part.data() + (n * nch + ch) * 5 * C; };
  auto xhat_planes = [&](int64_t n) { return std::array<float*, 6>{pl.a(0, n), pl.a(1, n), pl.a(2, n), pl.a(3, n), pl.a(4, n), pl.a(5, n)}; };

  // _spec.standardize_from_moments' x_hat constants per channel (XHat), and g's first value per group
  auto consts = [&](int64_t n, int64_t) {
    auto out = xhat_planes(n);
    xhat_consts(stats + n * G, g, out.data(), slow_x.data() + n * C);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t first = (c / Cg) * Cg;
      pl.a(6, n)[c] = center ? ld(dy[n * S * C + first]) * w[first] : 0.f;
    }
  };
  // _spec.grad_sums unscaled and _spec.affine_backward's parameter sums, in one read of dy and x: max |dy|
  // (max |g| = max |dy| * |w| exactly: rounding is monotonic), sum(g - g0), sum((g - g0) * x_hat),
  // sum(dy * x_hat), sum(dy)
  auto sums = [&](int64_t n, int64_t ch) {
    const T* dyp = dy + n * S * C;
    const T* xp = x + n * S * C;
    auto xh = xhat_planes(n);
    const float* cs[8] = {xh[0], xh[1], xh[2], xh[3], xh[4], xh[5], w, pl.a(6, n)};
    chunk_totals<8, 4, true>(g.r0(ch), g.r1(ch), C, cs, slow_x.data() + n * C,
        [dyp, xp](auto t, int64_t i, const auto& k, int j, auto& m, auto& v1, auto& v2, auto& v3,
                     auto& v4, auto&) {
          using Vt = lane_t<decltype(t)>;
          const Vt d = load<Vt>(dyp + i);
          const Vt xv = x_hat<0, decltype(t)::slow>(load<Vt>(xp + i), k, j);
          const Vt gs = d * k[6][j] - k[7][j];
          m = vabs(d); v1 = gs; v2 = gs * xv; v3 = d * xv; v4 = d;
        }, chunk_part(n, ch));
  };
  // parameter sums per (n, c); the groups where _spec.plain_grad_ok fails get their sums again, scaled
  auto decide = [&](int64_t n, int64_t) {
    std::vector<float> tot(5 * C);
    combine_chunks(chunk_part(n, 0), 5 * C, nch, 4, C, tot.data());
    std::copy(tot.begin() + 3 * C, tot.begin() + 4 * C, pl.a(13, n));
    std::copy(tot.begin() + 4 * C, tot.begin() + 5 * C, pl.a(14, n));
    if (!need_dx) return;
    for (int64_t c = 0; c < C; ++c) tot[c] *= std::abs(w[c]);  // max |g| per channel
    for (int64_t gi = 0; gi < G; ++gi) {
      const int64_t c0 = gi * Cg;
      const float gmax = group_max(tot.data(), c0, Cg);
      gsum[2 * (n * G + gi)] = group_sum(tot.data() + C, c0, Cg);
      gsum[2 * (n * G + gi) + 1] = group_sum(tot.data() + 2 * C, c0, Cg);
      float sg = 1.f;
      if (!plain_grad(gmax)) {
        eg[n * G + gi] = exponent_of(gmax);
        sg = std::ldexp(1.f, -eg[n * G + gi]);
        robust[n * G + gi] = any_robust[n] = 1;
      }
      for (int64_t c = c0; c < c0 + Cg; ++c) { pl.a(7, n)[c] = sg; pl.a(8, n)[c] = pl.a(6, n)[c] * sg; }
    }
  };
  // _spec.grad_sums with g scaled by 2**-eg, for those groups
  auto robust_sums = [&](int64_t n, int64_t ch) {
    if (!need_dx || !any_robust[n]) return;
    const T* dyp = dy + n * S * C;
    const T* xp = x + n * S * C;
    auto xh = xhat_planes(n);
    const float* cs[9] = {xh[0], xh[1], xh[2], xh[3], xh[4], xh[5], w, pl.a(7, n), pl.a(8, n)};
    chunk_totals<9, 2, false>(g.r0(ch), g.r1(ch), C, cs, slow_x.data() + n * C,
        [dyp, xp](auto t, int64_t i, const auto& k, int j, auto&, auto& v1, auto& v2, auto&, auto&,
                     auto&) {
          using Vt = lane_t<decltype(t)>;
          const Vt gs = load<Vt>(dyp + i) * k[6][j] * k[7][j] - k[8][j];
          v1 = gs; v2 = gs * x_hat<0, decltype(t)::slow>(load<Vt>(xp + i), k, j);
        }, chunk_part(n, ch));
  };
  // _spec.standardize_backward_from_sums' coefficients per group (DxCoef)
  auto coefs = [&](int64_t n, int64_t) {
    if (!need_dx) return;
    std::vector<float> tot(3 * C);
    if (any_robust[n]) combine_chunks(chunk_part(n, 0), 5 * C, nch, 2, C, tot.data());
    for (int64_t gi = 0; gi < G; ++gi) {
      const int64_t c0 = gi * Cg;
      if (robust[n * G + gi]) {
        gsum[2 * (n * G + gi)] = group_sum(tot.data() + C, c0, Cg);
        gsum[2 * (n * G + gi) + 1] = group_sum(tot.data() + 2 * C, c0, Cg);
      }
      const DxCoef co(stats[n * G + gi], gsum[2 * (n * G + gi)], gsum[2 * (n * G + gi) + 1], count, eg[n * G + gi], center);
      for (int64_t c = c0; c < c0 + Cg; ++c) {
        pl.a(9, n)[c] = co.mg; pl.a(10, n)[c] = co.mgx; pl.a(11, n)[c] = co.m2; pl.a(12, n)[c] = static_cast<float>(co.q2);
        slow_dx[n * C + c] = slow_x[n * C + c] || co.m2 == 0.f;
      }
    }
  };
  // _spec.standardize_backward_from_sums: dx = ((gs - mean(gs)) - x_hat * mean(gs * x_hat)) * r * 2**(k + eg)
  const bool nt = streaming(dx, C, N * S * C);
  auto grad = [&](int64_t n, int64_t ch) {
    if (!need_dx) return;
    const T* dyp = dy + n * S * C;
    const T* xp = x + n * S * C;
    auto xh = xhat_planes(n);
    const float* cs[13] = {xh[0], xh[1], xh[2], xh[3], xh[4], xh[5], w, pl.a(7, n), pl.a(8, n), pl.a(9, n), pl.a(10, n),
                           pl.a(11, n), pl.a(12, n)};
    map_rows<13>(g.r0(ch), g.r1(ch), C, cs, slow_dx.data() + n * C,
        [dyp, xp](auto t, int64_t i, const auto& k, int j) {
          using Vt = lane_t<decltype(t)>;
          const Vt gs = load<Vt>(dyp + i) * k[6][j] * k[7][j] - k[8][j];
          const Vt u = (gs - k[9][j]) - x_hat<0, decltype(t)::slow>(load<Vt>(xp + i), k, j) * k[10][j];
          if constexpr (decltype(t)::slow) return pow2(u * k[4][j], static_cast<int>(k[12][j]));
          else return u * k[11][j];
        }, dx + n * S * C, nt);
  };
  auto robust_sample = [&](int64_t n) { return need_dx && any_robust[n] != 0; };
  auto with_dx = [&](int64_t) { return need_dx; };
  run_steps(g, {{false, consts}, {true, sums}, {false, decide}, {true, robust_sums, robust_sample},
                {false, coefs, with_dx}, {true, grad, with_dx}});
  if (need_param) {
    for (int64_t c = 0; c < C; ++c) {
      Acc aw, ab;
      for (int64_t n = 0; n < N; ++n) { aw.add(pl.a(13, n)[c]); ab.add(pl.a(14, n)[c]); }
      dw[c] = aw.s; db[c] = ab.s;
    }
  }
}

// ---- given statistics (batch norm eval) on x (R, C): _spec.affine_with_stats ----

// Per channel: 0 mean, 1 rstd, 2 the factor w * rstd as one float, 3..4 its split (m, q), 5 bias, 6 whether
// the factor is one float (Factor::one); Factor is _spec.eval_factor (rstd = inv_std(var, 0, eps)). Slow where
// it is not one float, or where x - mean can overflow for a finite x: |mean| >= 2**103, the half ulp of FLT_MAX.
inline std::vector<Factor> eval_consts(const float* mean, const float* var, const float* w, const float* b, double eps,
                                       int64_t C, Planes& pl, std::vector<uint8_t>& slow) {
  std::vector<Factor> factors = channel_factors(w, var, C, eps);
  for (int64_t c = 0; c < C; ++c) {
    const Factor& fa = factors[c];
    pl.a(0, 0)[c] = mean[c]; pl.a(1, 0)[c] = fa.rstd(); pl.a(2, 0)[c] = fa.f; pl.a(3, 0)[c] = fa.m;
    pl.a(4, 0)[c] = static_cast<float>(fa.q); pl.a(5, 0)[c] = b ? b[c] : 0.f; pl.a(6, 0)[c] = fa.one ? 1.f : 0.f;
    slow[c] = !fa.one || !(std::abs(mean[c]) < 0x1p103f);
  }
  return factors;
}

inline std::array<const float*, 7> eval_planes(Planes& pl) {
  return {pl.a(0, 0), pl.a(1, 0), pl.a(2, 0), pl.a(3, 0), pl.a(4, 0), pl.a(5, 0), pl.a(6, 0)};
}

template <typename T>
void eval_forward_impl(const T* x, T* y, const float* mean, const float* var, const float* w, const float* b,
                       double eps, int64_t R, int64_t C) {
  const Geo g(1, R, C, 1);
  Planes pl(7, 1, C);
  std::vector<uint8_t> slow(C);
  eval_consts(mean, var, w, b, eps, C, pl, slow);
  const auto cs = eval_planes(pl);
  run_steps(g, {{true, [&](int64_t, int64_t ch) {
    map_rows<7>(g.r0(ch), g.r1(ch), C, cs.data(), slow.data(), [x](auto t, int64_t i, const auto& k, int j) {
      using Vt = lane_t<decltype(t)>;
      const Vt v = load<Vt>(x + i), mu = k[0][j], diff = v - mu;
      if constexpr (decltype(t)::slow) {  // eval_forward_impl's split factor and halves, element by element
        const int q = static_cast<int>(k[4][j]);
        float out = k[6][j] != 0.f ? diff * k[2][j] + k[5][j] : apply_split(diff, k[3][j], q) + k[5][j];
        if (std::isinf(diff) && std::isfinite(v) && std::isfinite(mu)) out = apply_split(v * 0.5f - mu * 0.5f, k[3][j], q + 1) + k[5][j];
        return out;
      } else {
        return diff * k[2][j] + k[5][j];
      }
    }, y, streaming(y, C, R * C));
  }}});
}

// _spec.affine_with_stats_backward
template <typename T>
void eval_backward_impl(const T* dy, const T* x, T* dx, const float* mean, const float* var, const float* w, double eps,
                        int64_t R, int64_t C, bool need_dx, bool need_param, float* dw, float* db) {
  const Geo g(1, R, C, 1);
  Planes pl(7, 1, C);
  std::vector<uint8_t> slow(C);
  const std::vector<Factor> factors = eval_consts(mean, var, w, nullptr, eps, C, pl, slow);
  const auto cs = eval_planes(pl);
  auto dx_of = [](auto t, auto d, const auto& k, int j) {  // dy * (w * rstd), split where it is not one float
    if constexpr (decltype(t)::slow) return k[6][j] != 0.f ? d * k[2][j] : apply_split(d, k[3][j], static_cast<int>(k[4][j]));
    else return d * k[2][j];
  };
  if (need_param) {  // one pass: sum(dy * x_hat), sum(dy), and dx when asked
    std::vector<float> part(static_cast<size_t>(g.nch * 3 * C));
    auto pass = [&](auto out) {
      constexpr bool Out = decltype(out)::value;
      run_steps(g, {{true, [&](int64_t, int64_t ch) {
        chunk_totals<7, 2, false, Out>(g.r0(ch), g.r1(ch), C, cs.data(), slow.data(),
            [dy, x, dx_of](auto t, int64_t i, const auto& k, int j, auto&, auto& v1, auto& v2, auto&,
                              auto&, auto& o) {
              using Vt = lane_t<decltype(t)>;
              const Vt d = load<Vt>(dy + i), xv = load<Vt>(x + i), mu = k[0][j], rs = k[1][j];
              const Vt diff = xv - mu;
              Vt xh = diff * rs;
              if constexpr (decltype(t)::slow) {  // x - mean taken in halves where it overflows
                if (std::abs(diff) > FLT_MAX) xh = ((xv * 0.5f - mu * 0.5f) * rs) * 2.f;
              }
              v1 = d * xh; v2 = d; o = dx_of(t, d, k, j);  // o is dropped without Out
            }, part.data() + ch * 3 * C, dx, streaming(dx, C, R * C));
      }}});
    };
    if (need_dx) pass(std::true_type());
    else pass(std::false_type());
    std::vector<float> tot(3 * C);
    combine_chunks(part.data(), 3 * C, g.nch, 2, C, tot.data());
    std::copy(tot.begin() + C, tot.begin() + 2 * C, dw);
    std::copy(tot.begin() + 2 * C, tot.begin() + 3 * C, db);
    for (int64_t c = 0; c < C; ++c) {  // x_hat or a product left the range: _spec.eval_dweight (rstd applied last)
      if (std::isfinite(dw[c])) continue;
      dw[c] = eval_dweight(R, [&](int64_t r, float& d, float& xv) { d = ld(dy[r * C + c]); xv = ld(x[r * C + c]); },
                           mean[c], factors[c]);
    }
  } else if (need_dx) {
    run_steps(g, {{true, [&](int64_t, int64_t ch) {
      map_rows<7>(g.r0(ch), g.r1(ch), C, cs.data(), slow.data(), [dy, dx_of](auto t, int64_t i,
                                                                                const auto& k, int j) {
        return dx_of(t, load<lane_t<decltype(t)>>(dy + i), k, j);
      }, dx, streaming(dx, C, R * C));
    }}});
  }
}

// Forward with statistics of x, laid out (N, S, C) in memory (contiguous; any shape whose first dim is N and last C,
// e.g. a channels_last tensor permuted channels-last), layout 3 (GROUPS_CL): a group per (n, g) = S rows x C / groups
// channels; weight, bias float32, C values. Returns (y (x's sizes), stats (N * groups, 8)) as stats_forward does.
std::tuple<torch::Tensor, torch::Tensor> stats_forward_cl(const torch::Tensor& x, const torch::Tensor& weight,
                                                          const torch::Tensor& bias, int64_t groups, int64_t C,
                                                          double eps, bool center, bool output) {
  check_input(x, 2, "stats_forward_cl");
  const Extent ex = extent(x, 3, C, "stats_forward_cl");
  const int64_t N = ex.N, S = ex.S;
  TORCH_CHECK(groups >= 1 && C % groups == 0, "stats_forward_cl: groups=", groups, " must divide C=", C);
  if (output) {
    check_param(weight, C, "stats_forward_cl: weight");
    check_param(bias, C, "stats_forward_cl: bias");
  }
  torch::Tensor y = output ? torch::empty(x.sizes(), x.options()) : torch::Tensor();
  auto stats = torch::empty({N * groups, 8}, x.options().dtype(at::kFloat));
  const Geo g(N, S, C, groups);
  dispatch_dtype(x, "stats_forward_cl", [&](auto tag) {
    using T = decltype(tag);
    forward_impl<T>(x.data_ptr<T>(), output ? y.data_ptr<T>() : nullptr, reinterpret_cast<Stat*>(stats.data_ptr<float>()),
                    g, output ? weight.data_ptr<float>() : nullptr, output ? bias.data_ptr<float>() : nullptr, eps, center);
  });
  return {y, stats};
}

// Backward of stats_forward_cl: (dx or empty, dweight (float32) or empty, dbias (float32) or empty).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> stats_backward_cl(
    const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& stats,
    int64_t groups, int64_t C, bool center, bool need_dx, bool need_param) {
  check_input(x, 2, "stats_backward_cl");
  check_grad(dy, x, "stats_backward_cl");
  const Extent ex = extent(x, 3, C, "stats_backward_cl");
  const int64_t N = ex.N, S = ex.S;
  TORCH_CHECK(groups >= 1 && C % groups == 0, "stats_backward_cl: groups=", groups, " must divide C=", C);
  check_param(weight, C, "stats_backward_cl: weight");
  check_stats(stats, N * groups, "stats_backward_cl");
  torch::Tensor dx, dw, db;  // not a structured binding: the lambda below captures them (C++17)
  std::tie(dx, dw, db) = grad_buffers(x, C, need_dx, need_param);
  const Geo g(N, S, C, groups);
  dispatch_dtype(x, "stats_backward_cl", [&](auto tag) {
    using T = decltype(tag);
    backward_impl<T>(dy.data_ptr<T>(), x.data_ptr<T>(), need_dx ? dx.data_ptr<T>() : nullptr,
                     reinterpret_cast<const Stat*>(stats.data_ptr<float>()), g, weight.data_ptr<float>(), center,
                     need_dx, need_param, need_param ? dw.data_ptr<float>() : nullptr,
                     need_param ? db.data_ptr<float>() : nullptr);
  });
  return {dx, dw, db};
}

// y = (x - mean) * rsqrt(var + eps) * weight + bias per channel of x (..., C) (contiguous, read as (R, C));
// mean, var, weight, bias float32, C values.
torch::Tensor eval_forward_cl(const torch::Tensor& x, const torch::Tensor& mean, const torch::Tensor& var,
                              const torch::Tensor& weight, const torch::Tensor& bias, double eps) {
  check_input(x, 1, "eval_forward_cl");
  const int64_t C = x.size(-1), R = x.numel() / C;
  check_param(mean, C, "eval_forward_cl: mean"); check_param(var, C, "eval_forward_cl: var");
  check_param(weight, C, "eval_forward_cl: weight"); check_param(bias, C, "eval_forward_cl: bias");
  auto y = torch::empty(x.sizes(), x.options());
  dispatch_dtype(x, "eval_forward_cl", [&](auto tag) {
    using T = decltype(tag);
    eval_forward_impl<T>(x.data_ptr<T>(), y.data_ptr<T>(), mean.data_ptr<float>(), var.data_ptr<float>(),
                         weight.data_ptr<float>(), bias.data_ptr<float>(), eps, R, C);
  });
  return y;
}

// Backward of eval_forward_cl: (dx or empty, dweight or empty, dbias or empty), parameter grads in float32.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> eval_backward_cl(
    const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& mean, const torch::Tensor& var,
    const torch::Tensor& weight, double eps, bool need_dx, bool need_param) {
  check_input(x, 1, "eval_backward_cl");
  check_grad(dy, x, "eval_backward_cl");
  const int64_t C = x.size(-1), R = x.numel() / C;
  check_param(mean, C, "eval_backward_cl: mean"); check_param(var, C, "eval_backward_cl: var");
  check_param(weight, C, "eval_backward_cl: weight");
  torch::Tensor dx, dw, db;  // not a structured binding: the lambda below captures them (C++17)
  std::tie(dx, dw, db) = grad_buffers(x, C, need_dx, need_param);
  dispatch_dtype(x, "eval_backward_cl", [&](auto tag) {
    using T = decltype(tag);
    eval_backward_impl<T>(dy.data_ptr<T>(), x.data_ptr<T>(), need_dx ? dx.data_ptr<T>() : nullptr,
                          mean.data_ptr<float>(), var.data_ptr<float>(), weight.data_ptr<float>(), eps, R, C,
                          need_dx, need_param, need_param ? dw.data_ptr<float>() : nullptr,
                          need_param ? db.data_ptr<float>() : nullptr);
  });
  return {dx, dw, db};
}

}  // namespace nk_cl
