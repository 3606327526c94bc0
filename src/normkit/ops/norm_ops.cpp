// The normkit:: operators of the statistics kernels (schemas: normkit/ops/_kernels.py), registered here for the CPU
// and Autograd dispatch keys, and their Python entry points.
//
//   stats_norm(x, weight?, bias?, layout, groups, C, eps, center) -> (y, stats)       norm_kernel.cpp / _cl
//   stats_norm_backward(dy, x, weight?, stats, layout, groups, C, center, need_dx, need_param) -> (dx, dw, db)
//   affine_eval(x, mean, var, weight?, bias?, layout, eps) -> y                       given statistics
//   affine_eval_backward(dy, x, mean, var, weight?, layout, eps, need_dx, need_param) -> (dx, dw, db)
//   running_stats(running_mean, running_var, stats, count, momentum) -> (new_mean, new_var)   batch norm's buffers
//
// CPU kernels (the *_cpu functions): x as the layout reads it (rows (R, D = C); (N, C, *); channels last (N, *, C)),
// in any memory layout (below), parameters of any shape with C values in float32 or x's dtype, or none (ones /
// zeros): the conversions, the choice between norm_kernel.cpp and channels_last_kernel.cpp, and nothing else. Only
// CPU kernels are registered: on another device the dispatcher refuses the call with its own clear error.
//
// Autograd (the *_autograd functions): where no input needs a gradient the call goes straight below autograd;
// otherwise a torch::autograd::Function keeps x, the parameters and 8 floats of statistics per group, and its
// backward calls the backward op through the dispatcher (so make_fx and torch.compile record it). When backward
// itself is differentiated (grad mode on in backward: create_graph), it calls the *_backward_graph ops instead,
// which normkit/ops/_kernels.py implements with the spec's differentiable torch ops.
//
// The Python entry points (exported by normkit/_native.py) are the dispatcher calls of the four ops: one C++ call
// per normalization, with autograd, dispatch modes and fake tensors handled by the dispatcher.

#include "norm_common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/python_variable.h>

namespace nk_ops {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<Tensor>;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

constexpr int64_t kGroupsCL = 3;  // channels last: x (N, *, C) (ops/_kernels.py: GROUPS_CL)

// A parameter (weight, bias, mean, var) as the kernels read it: float32, contiguous, C values; `fill` where none
inline Tensor param_f32(const OptTensor& t, int64_t C, float fill, const char* what) {
  if (!t.has_value() || !t->defined()) return torch::full({C}, fill, torch::dtype(at::kFloat));
  TORCH_CHECK(t->device().is_cpu() && t->is_floating_point() && t->numel() == C, what,
              ": expected a floating-point CPU tensor of ", C, " elements, got sizes ", t->sizes(), ", dtype ",
              t->scalar_type(), " on ", t->device());
  return (t->scalar_type() == at::kFloat ? *t : t->to(at::kFloat)).contiguous();
}

inline bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }
inline bool requires_grad(const OptTensor& t) { return defined(t) && t->requires_grad(); }

// ---- CPU kernels --------------------------------------------------------------------------------------------------
// Outputs have x's strides, as at::empty_like(x) lays them out (the fake kernels say so, and Inductor, which keeps
// convolutions channels last on CPU, may hand over any layout): a contiguous x as it is; an x whose channel dims
// (those after the first, C values) are innermost in memory -- channels_last, or group norm's grouped view of it --
// through the channels-last kernels (layouts GROUPS and CHANNELS); anything else computed on a contiguous copy and
// copied back into x's strides.

// The permutation moving x's channel dims (1..j, C values) after the others, where that makes x contiguous; else empty
std::vector<int64_t> channels_minor(const Tensor& x, int64_t C) {
  const int64_t nd = x.dim();
  if (nd < 3 || x.is_contiguous()) return {};
  int64_t j = 1, prod = 1;
  for (; j < nd && prod < C; ++j) prod *= x.size(j);
  if (prod != C || j >= nd) return {};
  std::vector<int64_t> perm{0};
  for (int64_t d = j; d < nd; ++d) perm.push_back(d);
  for (int64_t d = 1; d < j; ++d) perm.push_back(d);
  return x.permute(perm).is_contiguous() ? perm : std::vector<int64_t>{};
}

std::vector<int64_t> inverse(const std::vector<int64_t>& perm) {
  std::vector<int64_t> inv(perm.size());
  for (size_t i = 0; i < perm.size(); ++i) inv[perm[i]] = static_cast<int64_t>(i);
  return inv;
}

// `t` (computed contiguous) in the strides at::empty_like(like) gives
Tensor in_strides_of(const Tensor& t, const Tensor& like) {
  if (like.is_contiguous()) return t;
  Tensor out = at::empty_like(like);
  out.copy_(t);
  return out;
}

// x read as (N', S, C) channels last by the _cl kernels: batch norm (CHANNELS) as one sample of N * S rows
inline Tensor cl_rows(const Tensor& xp, int64_t layout, int64_t C) { return layout == 2 ? xp.reshape({1, -1, C}) : xp; }

// stats_forward of the layout's kernel for any strides of x (see above); `output` false: the statistics alone
Tensor2 stats_any_layout(const Tensor& x, const Tensor& w, const Tensor& b, int64_t layout, int64_t groups, int64_t C,
                         double eps, bool center, bool output) {
  if (layout == kGroupsCL) return nk_cl::stats_forward_cl(x.contiguous(), w, b, groups, C, eps, center, output);
  const auto perm = layout == 1 || layout == 2 ? channels_minor(x, C) : std::vector<int64_t>{};
  Tensor y, stats;
  if (!perm.empty()) {
    const Tensor xp = x.permute(perm);
    std::tie(y, stats) = nk_cl::stats_forward_cl(cl_rows(xp, layout, C), w, b, layout == 2 ? C : groups, C, eps, center,
                                                 output);
    return {output ? y.view(xp.sizes()).permute(inverse(perm)) : y, stats};
  }
  std::tie(y, stats) = nk_norm::stats_forward(x.contiguous(), w, b, layout, groups, C, eps, center, output);
  return {output ? in_strides_of(y, x) : y, stats};
}

Tensor2 stats_norm_cpu(const Tensor& x, const OptTensor& weight, const OptTensor& bias, int64_t layout, int64_t groups,
                       int64_t C, double eps, bool center) {
  const Tensor w = param_f32(weight, C, 1.f, "stats_norm: weight"), b = param_f32(bias, C, 0.f, "stats_norm: bias");
  return stats_any_layout(x, w, b, layout, groups, C, eps, center, true);
}

// stats_norm's statistics alone, and each group's x_hat as a chain of multiplies by its constants -- rows 2**-e, pivot,
// mean_d, r, 2**k1, 2**k2, 2**k3 (XHat's; k1 + k2 + k3 = k + e, split as _spec.mul_pow2 splits it):
//   x_hat = ((((((x * 2**-e) - pivot) - mean_d) * r) * 2**k1) * 2**k2) * 2**k3,
// _spec.standardize_from_moments' x_hat, as the kernels form it (for torch.compile's batch norm in training, whose
// affine Inductor then fuses with its neighbours: ops/_normalize.py, StandardizeAffineCompiled).
Tensor2 group_stats_cpu(const Tensor& x, int64_t layout, int64_t groups, int64_t C, double eps, bool center) {
  const Tensor none;
  const Tensor stats = std::get<1>(stats_any_layout(x, none, none, layout, groups, C, eps, center, false));
  const int64_t G = stats.size(0);
  Tensor consts = torch::empty({7, G}, torch::dtype(at::kFloat));
  const auto* st = reinterpret_cast<const nk_norm::Stat*>(stats.data_ptr<float>());
  float* o = consts.data_ptr<float>();
  constexpr int bound = 3 * nk_norm::kMaxExp;
  for (int64_t g = 0; g < G; ++g) {
    const nk_norm::XHat h(st[g]);
    const int q = std::min(std::max(h.q, -bound), bound);
    const int k1 = q / 3, k2 = (q - k1) / 2, k3 = q - k1 - k2;  // C++ division truncates, as torch.trunc
    o[g] = h.s; o[G + g] = h.piv; o[2 * G + g] = h.mean_d; o[3 * G + g] = h.r;
    o[4 * G + g] = nk_norm::exp2i(k1); o[5 * G + g] = nk_norm::exp2i(k2); o[6 * G + g] = nk_norm::exp2i(k3);
  }
  return {stats, consts};
}

Tensor3 stats_norm_backward_cpu(const Tensor& dy, const Tensor& x, const OptTensor& weight, const Tensor& stats,
                                int64_t layout, int64_t groups, int64_t C, bool center, bool need_dx, bool need_param) {
  const Tensor w = param_f32(weight, C, 1.f, "stats_norm_backward: weight");
  TORCH_CHECK(dy.sizes() == x.sizes(), "stats_norm_backward: expected dy of x's sizes ", x.sizes(), ", got ", dy.sizes());
  if (layout == kGroupsCL)
    return nk_cl::stats_backward_cl(dy.contiguous(), x.contiguous(), w, stats, groups, C, center, need_dx, need_param);
  Tensor dx, dw, db;
  const auto perm = layout == 1 || layout == 2 ? channels_minor(x, C) : std::vector<int64_t>{};
  if (!perm.empty()) {
    const Tensor xp = x.permute(perm);
    std::tie(dx, dw, db) = nk_cl::stats_backward_cl(cl_rows(dy.permute(perm).contiguous(), layout, C), cl_rows(xp, layout, C),
                                                    w, stats, layout == 2 ? C : groups, C, center, need_dx, need_param);
    return {need_dx ? dx.view(xp.sizes()).permute(inverse(perm)) : dx, dw, db};
  }
  std::tie(dx, dw, db) = nk_norm::stats_backward(dy.contiguous(), x.contiguous(), w, stats, layout, groups, C, center,
                                                 need_dx, need_param);
  return {need_dx ? in_strides_of(dx, x) : dx, dw, db};
}

inline int64_t eval_channels(const Tensor& x, int64_t layout, const char* op) {
  TORCH_CHECK(layout == 2 || layout == kGroupsCL, op, ": layout must be 2 (N, C, *) or 3 (channels last), got ", layout);
  TORCH_CHECK(x.dim() >= (layout == 2 ? 2 : 1), op, ": expected x of at least ", layout == 2 ? 2 : 1, " dims, got sizes ",
              x.sizes());
  return layout == 2 ? x.size(1) : x.size(-1);
}

// layout 2: x (N, C, *); layout 3: channels last, x (..., C)
Tensor affine_eval_cpu(const Tensor& x, const Tensor& mean, const Tensor& var, const OptTensor& weight,
                       const OptTensor& bias, int64_t layout, double eps) {
  const int64_t C = eval_channels(x, layout, "affine_eval");
  const Tensor m = param_f32(mean, C, 0.f, "affine_eval: mean"), v = param_f32(var, C, 1.f, "affine_eval: var");
  const Tensor w = param_f32(weight, C, 1.f, "affine_eval: weight"), b = param_f32(bias, C, 0.f, "affine_eval: bias");
  if (layout == kGroupsCL) return nk_cl::eval_forward_cl(x.contiguous(), m, v, w, b, eps);
  const auto perm = channels_minor(x, C);
  if (!perm.empty()) return nk_cl::eval_forward_cl(x.permute(perm), m, v, w, b, eps).permute(inverse(perm));
  return in_strides_of(nk_norm::eval_forward(x.contiguous(), m, v, w, b, eps), x);
}

Tensor3 affine_eval_backward_cpu(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& var,
                                 const OptTensor& weight, int64_t layout, double eps, bool need_dx, bool need_param) {
  const int64_t C = eval_channels(x, layout, "affine_eval_backward");
  TORCH_CHECK(dy.sizes() == x.sizes(), "affine_eval_backward: expected dy of x's sizes ", x.sizes(), ", got ", dy.sizes());
  const Tensor m = param_f32(mean, C, 0.f, "affine_eval_backward: mean");
  const Tensor v = param_f32(var, C, 1.f, "affine_eval_backward: var");
  const Tensor w = param_f32(weight, C, 1.f, "affine_eval_backward: weight");
  if (layout == kGroupsCL) return nk_cl::eval_backward_cl(dy.contiguous(), x.contiguous(), m, v, w, eps, need_dx, need_param);
  Tensor dx, dw, db;
  const auto perm = channels_minor(x, C);
  if (!perm.empty()) {
    std::tie(dx, dw, db) = nk_cl::eval_backward_cl(dy.permute(perm).contiguous(), x.permute(perm), m, v, w, eps, need_dx,
                                                   need_param);
    return {need_dx ? dx.permute(inverse(perm)) : dx, dw, db};
  }
  std::tie(dx, dw, db) = nk_norm::eval_backward(dy.contiguous(), x.contiguous(), m, v, w, eps, need_dx, need_param);
  return {need_dx ? in_strides_of(dx, x) : dx, dw, db};
}

// _spec.affine_with_stats of each channel as a chain of multiplies by per-channel constants, for torch.compile's eval
// batch norm (ops/_normalize.py: StatsAffineCompiled), which Inductor fuses with its neighbours:
//   y = ((((x * a - a * mean) * m') * 2**k1) * 2**k2) * 2**k3 + bias.
// Rows: a, a * mean, m', 2**k1, 2**k2, 2**k3. m * 2**q = weight * rstd is _spec.eval_factor's split factor (Factor);
// _spec.apply_factor(d, m, q') is mul_pow2((d * 2**-s) * m, q' + s), s = 4 where q' < 0, so m' = m * 2**-s and
// k1 + k2 + k3 = q' + s, split as _spec.mul_pow2 splits it (each a normal power of two). _spec.centered takes
// x - mean in halves (h = 1, q' = q + 1) where the difference overflows, which for a finite x can happen only if
// |mean| >= 2**103 (half an ulp of FLT_MAX): a = 1/2 for such a channel, for all its elements -- there x * 1/2 and
// mean * 1/2 are exact (x's rounding is negligible against the mean), so each element gets the spec's value.
Tensor eval_constants_cpu(const Tensor& mean, const Tensor& var, const OptTensor& weight, double eps) {
  const int64_t C = var.numel();
  TORCH_CHECK(C > 0, "eval_constants: expected statistics of at least one channel");
  const Tensor mu = param_f32(mean, C, 0.f, "eval_constants: mean"), v = param_f32(var, C, 1.f, "eval_constants: var");
  const Tensor w = param_f32(weight, C, 1.f, "eval_constants: weight");
  Tensor out = torch::empty({6, C}, torch::dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const float *pm = mu.data_ptr<float>(), *pv = v.data_ptr<float>(), *pw = w.data_ptr<float>();
  const nk_norm::Eps eps_split(eps);
  constexpr int bound = 3 * nk_norm::kMaxExp;
  for (int64_t c = 0; c < C; ++c) {
    const nk_norm::Factor fa(pw[c], pv[c], eps_split);
    const int h = std::isfinite(pm[c]) && std::abs(pm[c]) >= 0x1p103f ? 1 : 0;
    const float a = h ? 0.5f : 1.f;
    const int qh = fa.q + h, sh = qh < 0 ? 4 : 0;
    const int k = std::min(std::max(qh + sh, -bound), bound);
    const int k1 = k / 3, k2 = (k - k1) / 2, k3 = k - k1 - k2;  // C++ division truncates, as torch.trunc
    o[c] = a; o[C + c] = pm[c] * a; o[2 * C + c] = fa.m * nk_norm::exp2i(-sh);
    o[3 * C + c] = nk_norm::exp2i(k1); o[4 * C + c] = nk_norm::exp2i(k2); o[5 * C + c] = nk_norm::exp2i(k3);
  }
  return out;
}

// Batch norm's running statistics after a training step, from stats_norm's per-channel statistics (CHANNELS layout:
// a row of 8 floats per channel, mean and biased var in columns 5 and 6) -- _spec.running_stats in float32:
//   running <- running * (1 - momentum) + stat * momentum,   the variance made unbiased first: var * (count / (count - 1))
// each product rounded to float32 before the sum (no fused multiply-add), as torch's ops round them; returned in each
// running tensor's dtype. One call instead of a dozen small tensor ops on the routing cache's batch-norm route.
#if defined(__clang__)
#define NK_NO_CONTRACT
#elif defined(__GNUC__)
#define NK_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define NK_NO_CONTRACT
#endif
NK_NO_CONTRACT Tensor2 running_stats_cpu(const Tensor& running_mean, const Tensor& running_var, const Tensor& stats,
                                         int64_t count, double momentum) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  TORCH_CHECK(stats.dim() == 2 && stats.size(1) == 8 && stats.scalar_type() == at::kFloat && stats.is_contiguous(),
              "running_stats: expected stats_norm's contiguous float32 (C, 8) statistics, got sizes ", stats.sizes(),
              ", dtype ", stats.scalar_type());
  const int64_t C = stats.size(0);
  for (const Tensor* t : {&running_mean, &running_var})
    TORCH_CHECK(t->device().is_cpu() && t->is_floating_point() && t->numel() == C,
                "running_stats: expected running statistics of ", C, " floating-point CPU values, got sizes ", t->sizes(),
                ", dtype ", t->scalar_type(), " on ", t->device());
  TORCH_CHECK(count > 1, "running_stats: the unbiased variance needs more than one value per channel, got ", count);
  const Tensor rm = running_mean.to(at::kFloat).contiguous(), rv = running_var.to(at::kFloat).contiguous();
  Tensor new_mean = torch::empty({C}, torch::dtype(at::kFloat)), new_var = torch::empty({C}, torch::dtype(at::kFloat));
  const float keep = static_cast<float>(1.0 - momentum), take = static_cast<float>(momentum);
  const float bessel = static_cast<float>(static_cast<double>(count) / static_cast<double>(count - 1));
  const float *st = stats.data_ptr<float>(), *pm = rm.data_ptr<float>(), *pv = rv.data_ptr<float>();
  float *om = new_mean.data_ptr<float>(), *ov = new_var.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const float mean = st[8 * c + 5], var = st[8 * c + 6] * bessel;
    const float m1 = pm[c] * keep, m2 = mean * take, v1 = pv[c] * keep, v2 = var * take;
    om[c] = m1 + m2;
    ov[c] = v1 + v2;
  }
  return {new_mean.view(running_mean.sizes()).to(running_mean.scalar_type()),
          new_var.view(running_var.sizes()).to(running_var.scalar_type())};
}

// ---- the ops, called through the dispatcher -----------------------------------------------------------------------

#define NK_OP(name, fn)                                                                                     \
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("normkit::" name, "").typed<decltype(fn)>(); \
  return op

Tensor2 stats_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias, int64_t layout, int64_t groups,
                   int64_t C, double eps, bool center) {
  NK_OP("stats_norm", stats_norm_cpu).call(x, weight, bias, layout, groups, C, eps, center);
}

Tensor3 stats_norm_backward(const Tensor& dy, const Tensor& x, const OptTensor& weight, const Tensor& stats, int64_t layout,
                            int64_t groups, int64_t C, bool center, bool need_dx, bool need_param) {
  NK_OP("stats_norm_backward", stats_norm_backward_cpu).call(dy, x, weight, stats, layout, groups, C, center, need_dx,
                                                             need_param);
}

Tensor affine_eval(const Tensor& x, const Tensor& mean, const Tensor& var, const OptTensor& weight, const OptTensor& bias,
                   int64_t layout, double eps) {
  NK_OP("affine_eval", affine_eval_cpu).call(x, mean, var, weight, bias, layout, eps);
}

Tensor3 affine_eval_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& var, const OptTensor& weight,
                             int64_t layout, double eps, bool need_dx, bool need_param) {
  NK_OP("affine_eval_backward", affine_eval_backward_cpu).call(dy, x, mean, var, weight, layout, eps, need_dx, need_param);
}

Tensor2 running_stats(const Tensor& running_mean, const Tensor& running_var, const Tensor& stats, int64_t count,
                      double momentum) {
  NK_OP("running_stats", running_stats_cpu).call(running_mean, running_var, stats, count, momentum);
}

// the double-backward forms (ops/_kernels.py: the spec's differentiable ops, CompositeImplicitAutograd)
Tensor3 stats_norm_backward_graph_sig(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t, int64_t,
                                      int64_t, double, bool, bool, bool, bool);
Tensor3 affine_eval_backward_graph_sig(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                       const OptTensor&, int64_t, double, bool, bool, bool);

Tensor3 stats_norm_backward_graph(const Tensor& dy, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                  int64_t layout, int64_t groups, int64_t C, double eps, bool center, bool need_dx,
                                  bool need_w, bool need_b) {
  NK_OP("stats_norm_backward_graph", stats_norm_backward_graph_sig).call(dy, x, weight, bias, layout, groups, C, eps,
                                                                         center, need_dx, need_w, need_b);
}

Tensor3 affine_eval_backward_graph(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& var,
                                   const OptTensor& weight, const OptTensor& bias, int64_t layout, double eps, bool need_dx,
                                   bool need_w, bool need_b) {
  NK_OP("affine_eval_backward_graph", affine_eval_backward_graph_sig).call(dy, x, mean, var, weight, bias, layout, eps,
                                                                           need_dx, need_w, need_b);
}
#undef NK_OP

// ---- autograd -----------------------------------------------------------------------------------------------------

// A parameter gradient as its parameter has it: the kernels' float32 (C,) sums in the parameter's dtype and shape;
// undefined where not asked for (or where the graph op returned an empty placeholder)
inline Tensor as_param_grad(const Tensor& g, const Tensor& param, bool needed) {
  if (!needed || !param.defined() || !g.defined() || g.numel() == 0) return Tensor();
  const Tensor t = g.scalar_type() == param.scalar_type() ? g : g.to(param.scalar_type());
  return t.sizes() == param.sizes() ? t : t.reshape(param.sizes());
}
inline Tensor or_none(const Tensor& t, bool needed) { return needed && t.defined() && t.numel() > 0 ? t : Tensor(); }

// needs_input_grad of the forward argument whose autograd edge is `edge` (the edges number only the tensors given:
// an absent weight shifts the bias down by one); -1: an absent tensor
inline bool needs(AutogradContext* ctx, int edge) { return edge >= 0 && ctx->needs_input_grad(edge); }

struct StatsNormFn : public torch::autograd::Function<StatsNormFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               int64_t layout, int64_t groups, int64_t C, double eps, bool center) {
    Tensor y, stats;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, stats) = stats_norm(x, weight, bias, layout, groups, C, eps, center);
    }
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);  // stats never has a gradient: no zeros made for it
    ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()), stats});
    ctx->saved_data["layout"] = layout;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["C"] = C;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["center"] = center;
    return {y, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(8);  // (grads are not materialized: y had no gradient)
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &b = saved[2], &stats = saved[3];
    const int64_t layout = ctx->saved_data["layout"].toInt(), groups = ctx->saved_data["groups"].toInt();
    const int64_t C = ctx->saved_data["C"].toInt();
    const bool center = ctx->saved_data["center"].toBool();
    const bool need_dx = needs(ctx, 0), need_w = needs(ctx, w.defined() ? 1 : -1);
    const bool need_b = needs(ctx, b.defined() ? 1 + w.defined() : -1);
    const OptTensor wo = w.defined() ? OptTensor(w) : c10::nullopt, bo = b.defined() ? OptTensor(b) : c10::nullopt;
    Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {  // backward is being differentiated: the spec's ops, statistics rebuilt from x
      std::tie(dx, dw, db) = stats_norm_backward_graph(grads[0], x, wo, bo, layout, groups, C,
                                                       ctx->saved_data["eps"].toDouble(), center, need_dx, need_w, need_b);
      return {or_none(dx, need_dx), or_none(dw, need_w), or_none(db, need_b), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    std::tie(dx, dw, db) = stats_norm_backward(grads[0], x, wo, stats, layout, groups, C, center, need_dx, need_w || need_b);
    return {need_dx ? dx : Tensor(), as_param_grad(dw, w, need_w), as_param_grad(db, b, need_b),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct AffineEvalFn : public torch::autograd::Function<AffineEvalFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& mean, const Tensor& var,
                               const OptTensor& weight, const OptTensor& bias, int64_t layout, double eps) {
    Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = affine_eval(x, mean, var, weight, bias, layout, eps);
    }
    ctx->save_for_backward({x, mean, var, weight.value_or(Tensor()), bias.value_or(Tensor())});
    ctx->saved_data["layout"] = layout;
    ctx->saved_data["eps"] = eps;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &mean = saved[1], &var = saved[2], &w = saved[3], &b = saved[4];
    const int64_t layout = ctx->saved_data["layout"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool need_dx = needs(ctx, 0), need_w = needs(ctx, w.defined() ? 3 : -1);
    const bool need_b = needs(ctx, b.defined() ? 3 + w.defined() : -1);
    const OptTensor wo = w.defined() ? OptTensor(w) : c10::nullopt, bo = b.defined() ? OptTensor(b) : c10::nullopt;
    Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      std::tie(dx, dw, db) = affine_eval_backward_graph(grads[0], x, mean, var, wo, bo, layout, eps, need_dx, need_w, need_b);
      return {or_none(dx, need_dx), Tensor(), Tensor(), or_none(dw, need_w), or_none(db, need_b), Tensor(), Tensor()};
    }
    std::tie(dx, dw, db) = affine_eval_backward(grads[0], x, mean, var, wo, layout, eps, need_dx, need_w || need_b);
    return {need_dx ? dx : Tensor(), Tensor(), Tensor(), as_param_grad(dw, w, need_w), as_param_grad(db, b, need_b),
            Tensor(), Tensor()};
  }
};

inline bool needs_grad(const Tensor& x, const OptTensor& a, const OptTensor& b) {
  return at::GradMode::is_enabled() && (x.requires_grad() || requires_grad(a) || requires_grad(b));
}

Tensor2 stats_norm_autograd(const Tensor& x, const OptTensor& weight, const OptTensor& bias, int64_t layout,
                            int64_t groups, int64_t C, double eps, bool center) {
  if (!needs_grad(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return stats_norm(x, weight, bias, layout, groups, C, eps, center);
  }
  const auto out = StatsNormFn::apply(x, weight, bias, layout, groups, C, eps, center);
  return {out[0], out[1]};
}

Tensor affine_eval_autograd(const Tensor& x, const Tensor& mean, const Tensor& var, const OptTensor& weight,
                            const OptTensor& bias, int64_t layout, double eps) {
  if (!needs_grad(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return affine_eval(x, mean, var, weight, bias, layout, eps);
  }
  return AffineEvalFn::apply(x, mean, var, weight, bias, layout, eps)[0];
}

}  // namespace nk_ops

TORCH_LIBRARY_IMPL(normkit, CPU, m) {
  m.impl("stats_norm", &nk_ops::stats_norm_cpu);
  m.impl("stats_norm_backward", &nk_ops::stats_norm_backward_cpu);
  m.impl("affine_eval", &nk_ops::affine_eval_cpu);
  m.impl("affine_eval_backward", &nk_ops::affine_eval_backward_cpu);
  m.impl("eval_constants", &nk_ops::eval_constants_cpu);
  m.impl("group_stats", &nk_ops::group_stats_cpu);
  m.impl("running_stats", &nk_ops::running_stats_cpu);
}

TORCH_LIBRARY_IMPL(normkit, Autograd, m) {
  m.impl("stats_norm", &nk_ops::stats_norm_autograd);
  m.impl("affine_eval", &nk_ops::affine_eval_autograd);
}

// The Python entry points (normkit/_native.py exports these names)
std::tuple<torch::Tensor, torch::Tensor> stats_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& weight,
                                                    const c10::optional<torch::Tensor>& bias, int64_t layout,
                                                    int64_t groups, int64_t C, double eps, bool center) {
  return nk_ops::stats_norm(x, weight, bias, layout, groups, C, eps, center);
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> stats_norm_backward(
    const torch::Tensor& dy, const torch::Tensor& x, const c10::optional<torch::Tensor>& weight, const torch::Tensor& stats,
    int64_t layout, int64_t groups, int64_t C, bool center, bool need_dx, bool need_param) {
  return nk_ops::stats_norm_backward(dy, x, weight, stats, layout, groups, C, center, need_dx, need_param);
}

torch::Tensor affine_eval(const torch::Tensor& x, const torch::Tensor& mean, const torch::Tensor& var,
                          const c10::optional<torch::Tensor>& weight, const c10::optional<torch::Tensor>& bias,
                          int64_t layout, double eps) {
  return nk_ops::affine_eval(x, mean, var, weight, bias, layout, eps);
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> affine_eval_backward(
    const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& mean, const torch::Tensor& var,
    const c10::optional<torch::Tensor>& weight, int64_t layout, double eps, bool need_dx, bool need_param) {
  return nk_ops::affine_eval_backward(dy, x, mean, var, weight, layout, eps, need_dx, need_param);
}

std::tuple<torch::Tensor, torch::Tensor> running_stats(const torch::Tensor& running_mean, const torch::Tensor& running_var,
                                                       const torch::Tensor& stats, int64_t count, double momentum) {
  return nk_ops::running_stats(running_mean, running_var, stats, count, momentum);
}

// The routing cache's key of a call's tensor arguments (normkit/ops/_plan.py: route): for each, 0 for None, else
// its Python type, dims, sizes, strides, dtype and device, packed as bytes; None (no cached route may serve) where
// an argument is neither a tensor nor None, or is a tensor of a torch.func transform, a Python subclass, or a dual
// tensor of forward-mode AD (torch.autograd.forward_ad's one level).
pybind11::object signature(const pybind11::args& tensors) {
  static const c10::DispatchKeySet kSpecial({c10::DispatchKey::Python,
      c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::BatchedNestedTensor,
      c10::DispatchKey::Functionalize});
  int64_t key[96];
  size_t n = 0;
  for (const auto& h : tensors) {
    if (h.is_none()) {
      if (n + 1 > 96) return pybind11::none();
      key[n++] = 0;
      continue;
    }
    if (!THPVariable_Check(h.ptr())) return pybind11::none();
    const at::Tensor& t = THPVariable_Unpack(h.ptr());
    if (!(t.key_set() & kSpecial).empty() || t.layout() != at::kStrided || t._fw_grad(0).defined()) return pybind11::none();
    const int64_t dim = t.dim();
    if (n + 4 + 2 * dim > 96) return pybind11::none();
    key[n++] = reinterpret_cast<int64_t>(Py_TYPE(h.ptr()));
    key[n++] = dim | (static_cast<int64_t>(t.scalar_type()) << 8) | (static_cast<int64_t>(t.device().type()) << 16) |
               (static_cast<int64_t>(t.device().index() + 1) << 32);
    for (int64_t d = 0; d < dim; ++d) { key[n++] = t.size(d); key[n++] = t.stride(d); }
  }
  return pybind11::bytes(reinterpret_cast<const char*>(key), n * sizeof(int64_t));
}
