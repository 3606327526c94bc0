// Fused CPU kernels for local response normalization across channels, the plain formula:
//
//   d_i  = k + c * sum_{j in [i - lo, i + hi]} x_j^2          y_i = x_i * d_i^-beta
//   dx_i = g_i * d_i^-beta - 2 c beta x_i * sum_{j in [i - hi, i + lo]} g_j x_j d_j^(-beta-1)
//
// in the product order of local_response_norm.py's plain formula (z_j = ((g_j x_j) / d_j) d_j^-beta, then
// dx_i = g_i d_i^-beta - 2 c beta (x_i sum z)). normkit calls these only where the spec's proof conditions
// hold (normkit/_spec.py: lrn_plain_forward_ok, lrn_plain_backward_ok, checked on the host in
// local_response_norm.py); elsewhere its robust decomposition runs. Input: contiguous (N, C, S).
// Each output row (n, c, :) reads the rows of its window, which sit in cache, and is written once:
// one pass over memory instead of one per elementwise op. Parallel over rows with torch's thread pool.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// d^-beta with the common exponents specialised: beta = 0.75 is rsqrt(d) * sqrt(rsqrt(d)).
template <typename T, int MODE>
inline T neg_pow(T d, T beta) {
  if constexpr (MODE == 0) { T r = T(1) / std::sqrt(d); return r * std::sqrt(r); }
  else if constexpr (MODE == 1) { return T(1) / std::sqrt(d); }
  else if constexpr (MODE == 2) { return T(1) / d; }
  else { return std::pow(d, -beta); }
}

// acc[s] = d = k + c * sum over the window of row ch of x[n, j, s]^2 (the plain formula's denominator)
template <typename T>
inline void window_denominator(const T* xn, int64_t C, int64_t S, int64_t ch, int64_t lo, int64_t hi,
                               T c, T k, T* acc) {
  std::fill(acc, acc + S, T(0));
  for (int64_t j = std::max<int64_t>(0, ch - lo); j <= std::min<int64_t>(C - 1, ch + hi); ++j) {
    const T* row = xn + j * S;
    for (int64_t s = 0; s < S; ++s) acc[s] += row[s] * row[s];
  }
  for (int64_t s = 0; s < S; ++s) acc[s] = k + c * acc[s];
}

// local_response_norm._fast_forward (the plain formula), taken where _spec.lrn_plain_forward_ok holds
template <typename T, int MODE>
void forward_impl(const T* x, T* y, int64_t N, int64_t C, int64_t S, int64_t lo, int64_t hi, T c, T k, T beta) {
  at::parallel_for(0, N * C, 8, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(S);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / C, ch = row % C;
      const T* xn = x + n * C * S;
      window_denominator(xn, C, S, ch, lo, hi, c, k, acc.data());
      const T* xr = xn + ch * S;
      T* yr = y + row * S;
      for (int64_t s = 0; s < S; ++s) yr[s] = xr[s] * neg_pow<T, MODE>(acc[s], beta);
    }
  });
}

// local_response_norm._fast_backward (the plain formula), taken where _spec.lrn_plain_backward_ok holds
template <typename T, int MODE>
void backward_impl(const T* g, const T* x, T* dx, int64_t N, int64_t C, int64_t S, int64_t lo, int64_t hi,
                   T c, T k, T beta) {
  const T two_c_beta = T(2) * c * beta;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p(C * S), q(C * S), acc(S);  // per sample: d^-beta and g x d^(-beta-1)
    for (int64_t n = begin; n < end; ++n) {
      const T* xn = x + n * C * S;
      const T* gn = g + n * C * S;
      for (int64_t ch = 0; ch < C; ++ch) {
        window_denominator(xn, C, S, ch, lo, hi, c, k, acc.data());
        const T* xr = xn + ch * S;
        const T* gr = gn + ch * S;
        T* pr = p.data() + ch * S;
        T* qr = q.data() + ch * S;
        for (int64_t s = 0; s < S; ++s) {
          const T pw = neg_pow<T, MODE>(acc[s], beta);
          pr[s] = pw;
          qr[s] = (gr[s] * xr[s] / acc[s]) * pw;  // z = ((g x) / d) d^-beta: lrn_plain_backward_ok's order
        }
      }
      for (int64_t ch = 0; ch < C; ++ch) {  // the reflected window: j in [ch - hi, ch + lo]
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t j = std::max<int64_t>(0, ch - hi); j <= std::min<int64_t>(C - 1, ch + lo); ++j) {
          const T* qr = q.data() + j * S;
          for (int64_t s = 0; s < S; ++s) acc[s] += qr[s];
        }
        const T* xr = xn + ch * S;
        const T* gr = gn + ch * S;
        const T* pr = p.data() + ch * S;
        T* dr = dx + (n * C + ch) * S;
        for (int64_t s = 0; s < S; ++s) dr[s] = gr[s] * pr[s] - two_c_beta * (xr[s] * acc[s]);
      }
    }
  });
}

int beta_mode(double beta) { return beta == 0.75 ? 0 : beta == 0.5 ? 1 : beta == 1.0 ? 2 : 3; }

template <typename T, typename F0, typename F1, typename F2, typename F3>
void dispatch_mode(double beta, F0 f0, F1 f1, F2 f2, F3 f3) {
  switch (beta_mode(beta)) { case 0: f0(); break; case 1: f1(); break; case 2: f2(); break; default: f3(); }
}

// x (and g): non-empty contiguous (N, C, S) CPU tensors of float32 or float64; a window of lo + hi + 1 >= 1
void check_lrn(const torch::Tensor& x, int64_t lo, int64_t hi, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": expected a CPU tensor, got one on ", x.device(),
              " (the native kernels are CPU only; normkit's eager path serves other devices)");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), op, ": expected a contiguous (N, C, S) tensor, got sizes ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": expected float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0, op, ": expected a non-empty (N, C, S) tensor, got sizes ",
              x.sizes(), " (normkit returns empty inputs before calling a kernel)");
  TORCH_CHECK(lo >= 0 && hi >= 0, op, ": expected a window [c - lo, c + hi] with lo, hi >= 0, got lo=", lo, ", hi=", hi);
}

}  // namespace

torch::Tensor lrn_forward(torch::Tensor x, int64_t lo, int64_t hi, double c, double k, double beta) {
  check_lrn(x, lo, hi, "lrn_forward");
  auto y = torch::empty_like(x);
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lrn_forward", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    dispatch_mode<T>(beta,
      [&] { forward_impl<T, 0>(xp, yp, N, C, S, lo, hi, T(c), T(k), T(beta)); },
      [&] { forward_impl<T, 1>(xp, yp, N, C, S, lo, hi, T(c), T(k), T(beta)); },
      [&] { forward_impl<T, 2>(xp, yp, N, C, S, lo, hi, T(c), T(k), T(beta)); },
      [&] { forward_impl<T, 3>(xp, yp, N, C, S, lo, hi, T(c), T(k), T(beta)); });
  });
  return y;
}

torch::Tensor lrn_backward(torch::Tensor g, torch::Tensor x, int64_t lo, int64_t hi, double c, double k, double beta) {
  check_lrn(x, lo, hi, "lrn_backward");
  TORCH_CHECK(g.device() == x.device() && g.is_contiguous() && g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
              "lrn_backward: expected a contiguous g of x's sizes ", x.sizes(), ", dtype and device, got sizes ", g.sizes());
  auto dx = torch::empty_like(x);
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lrn_backward", [&] {
    using T = scalar_t;
    const T* gp = g.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    T* dp = dx.data_ptr<T>();
    dispatch_mode<T>(beta,
      [&] { backward_impl<T, 0>(gp, xp, dp, N, C, S, lo, hi, T(c), T(k), T(beta)); },
      [&] { backward_impl<T, 1>(gp, xp, dp, N, C, S, lo, hi, T(c), T(k), T(beta)); },
      [&] { backward_impl<T, 2>(gp, xp, dp, N, C, S, lo, hi, T(c), T(k), T(beta)); },
      [&] { backward_impl<T, 3>(gp, xp, dp, N, C, S, lo, hi, T(c), T(k), T(beta)); });
  });
  return dx;
}
