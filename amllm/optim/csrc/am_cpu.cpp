// Fused CPU kernels of AM-AdamW and AM-SGD: one call per pass for a whole list of tensors.
//
// Loaded by amllm/optim/_cpu_ext.py (torch.utils.cpp_extension JIT build, cached).
// The math is the spec's (docs/optimizer.md), rewritten as in functional.py's
// foreach path and _compiled.py; every kernel is checked in lockstep against the float64
// oracle in tests/reference_am.py.
//
// AM-AdamW, pass 1 (needs this step's g; β not known yet):
//     vn = b2 v + (1 - b2) g^2                  (rounded as stored, NOT written: pass 2 writes
//                                                it, so a step can still be skipped after the
//                                                reduction; it also saves pass 1 a write)
//     p = c1 (sqrt(v) isc2 + eps),  u = 1 + lam p,  inv = 1 / (p u)   (inv = w, u inv = 1/p)
//     delta = d - g,  q = d / p = d u inv
//     sums per tensor: [sum g q, sum delta q, sum inv delta^2, sum g x, sum delta x]
//     (the x terms only when the group has weight decay: then x is not read at all)
// AM-AdamW, pass 2 (β known): v <- vn (recomputed), p from it, then
//     d <- (d (beta + lam p) + (1 - beta) g) / u,    x <- x (1 - lr wd) - lr d / p
// Both pass 2 entry points take the step's skip flag (a CPU bool tensor, or None): when it
// is set they return before touching memory; the flag is read here, not by Python.
// AM-SGD (coupled weight decay: G = g + wd x, never written back to g):
//     pass 1: delta = d - G; sums [sum G d, sum delta G, sum delta^2]
//     pass 2: d <- d + coef delta  (coef = (beta - 1) / (1 + lam)),  x <- x - lr d
//
// Why hand-written kernels: the update is memory-bound. One call walks every tensor of
// the bucket in chunks spread over torch's intra-op threads, so small tensors share one
// dispatch instead of paying ~50 us of Python each, and the sums stay in registers
// (Inductor's CPU reductions keep a cascade-summation stack in memory, which made its
// pass 1 compute-bound). Numerics: the math runs in float (double for float64 params),
// low-precision storage is converted on load and rounded once on store. A chunk's sums
// accumulate in the compute type (kChunk / vector-width terms per lane), chunk partials
// are added in double, in chunk order: the result does not depend on the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 14;

using TensorList = std::vector<at::Tensor>;

struct Span {
  int64_t k, begin, end;
};

std::vector<Span> make_spans(const TensorList& xs) {
  std::vector<Span> out;
  for (int64_t k = 0; k < static_cast<int64_t>(xs.size()); ++k) {
    const int64_t n = xs[k].numel();
    for (int64_t b = 0; b < n; b += kChunk) out.push_back({k, b, std::min(n, b + kChunk)});
  }
  return out;
}

void check_lists(std::initializer_list<const TensorList*> lists,
                 std::initializer_list<const std::vector<double>*> scalars) {
  const TensorList& xs = **lists.begin();
  for (const auto* l : lists) {
    TORCH_CHECK(l->size() == xs.size(), "amllm cpu kernels: tensor lists of different lengths");
    for (size_t k = 0; k < xs.size(); ++k) {
      const at::Tensor& t = (*l)[k];
      TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == xs[0].scalar_type() &&
                      t.numel() == xs[k].numel(),
                  "amllm cpu kernels: tensors must be contiguous CPU tensors of one dtype and matching sizes");
    }
  }
  for (const auto* s : scalars)
    TORCH_CHECK(s->size() == xs.size(), "amllm cpu kernels: one scalar per tensor expected");
}

// S: storage type, C: compute type.
template <typename S, typename C, bool kWithX>
void adamw_pass1_span(const S* __restrict x, const S* __restrict g, const S* __restrict d, const S* __restrict v,
                      int64_t b, int64_t e, C c1, C b2, C omb2, C eps, C lam, C isc2, double* out) {
  C s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4)
  for (int64_t i = b; i < e; ++i) {
    const C G = static_cast<C>(g[i]), D = static_cast<C>(d[i]);
    const S vs = static_cast<S>(static_cast<C>(v[i]) * b2 + omb2 * G * G);
    const C p = c1 * (std::sqrt(static_cast<C>(vs)) * isc2 + eps);
    const C u = C(1) + lam * p;
    const C inv = C(1) / (p * u);
    const C delta = D - G;
    const C q = D * u * inv;
    s0 += G * q;
    s1 += delta * q;
    s2 += delta * inv * delta;
    if constexpr (kWithX) {
      const C X = static_cast<C>(x[i]);
      s3 += G * X;
      s4 += delta * X;
    }
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3, out[4] = s4;
}

template <typename S, typename C>
void adamw_pass2_span(S* __restrict x, const S* __restrict g, S* __restrict d, S* __restrict v, int64_t b,
                      int64_t e, C c1, C beta, C omb, C b2, C omb2, C eps, C lam, C isc2, C lr, C decay) {
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    const C G = static_cast<C>(g[i]), D = static_cast<C>(d[i]), X = static_cast<C>(x[i]);
    const S vs = static_cast<S>(static_cast<C>(v[i]) * b2 + omb2 * G * G);
    v[i] = vs;
    const C p = c1 * (std::sqrt(static_cast<C>(vs)) * isc2 + eps);
    const C u = C(1) + lam * p;
    const C inv = C(1) / (p * u);
    const C dn = (D * (beta + lam * p) + omb * G) * (p * inv);
    d[i] = static_cast<S>(dn);
    x[i] = static_cast<S>(X * decay - lr * dn * (u * inv));
  }
}

template <typename S, typename C, bool kWithX>
void sgd_pass1_span(const S* __restrict x, const S* __restrict g, const S* __restrict d, int64_t b, int64_t e,
                    C wd, double* out) {
  C s0 = 0, s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s0, s1, s2)
  for (int64_t i = b; i < e; ++i) {
    C G = static_cast<C>(g[i]);
    if constexpr (kWithX) G += wd * static_cast<C>(x[i]);
    const C D = static_cast<C>(d[i]);
    const C delta = D - G;
    s0 += G * D;
    s1 += delta * G;
    s2 += delta * delta;
  }
  out[0] = s0, out[1] = s1, out[2] = s2;
}

template <typename S, typename C>
void sgd_pass2_span(S* __restrict x, const S* __restrict g, S* __restrict d, int64_t b, int64_t e, C coef, C lr,
                    C wd) {
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    const C X = static_cast<C>(x[i]);
    const C G = static_cast<C>(g[i]) + wd * X;
    const C D = static_cast<C>(d[i]);
    const C dn = D + coef * (D - G);
    d[i] = static_cast<S>(dn);
    x[i] = static_cast<S>(X - lr * dn);
  }
}

template <typename S>
S* ptr(const at::Tensor& t) {
  return static_cast<S*>(t.data_ptr());
}

// Calls f with (storage type, compute type) tags for the dtype of xs.
template <typename F>
auto dispatch(const TensorList& xs, const F& f) {
  switch (xs[0].scalar_type()) {
    case at::kFloat: return f(float{}, float{});
    case at::kDouble: return f(double{}, double{});
    case at::kBFloat16: return f(c10::BFloat16{}, float{});
    case at::kHalf: return f(c10::Half{}, float{});
    default: TORCH_CHECK(false, "amllm cpu kernels: unsupported dtype ", xs[0].scalar_type());
  }
}

// Chunk partials [n_spans, K] -> per-tensor sums [n, K] (double, in chunk order).
at::Tensor gather_sums(const std::vector<Span>& spans, const std::vector<double>& part, int64_t n, int64_t K) {
  auto out = at::zeros({n, K}, at::kDouble);
  double* o = out.data_ptr<double>();
  for (size_t s = 0; s < spans.size(); ++s)
    for (int64_t j = 0; j < K; ++j) o[spans[s].k * K + j] += part[s * K + j];
  return out;
}

// Runs body(S{}, C{}, span, out) over every chunk of every tensor on torch's intra-op
// threads (S: storage type, C: compute type); out points at the chunk's K partial sums.
// Returns the per-tensor sums [n, K] (float64, added in chunk order).
template <int64_t K, typename F>
at::Tensor over_chunks(const TensorList& xs, const F& body) {
  const auto spans = make_spans(xs);
  std::vector<double> part(spans.size() * K + 1, 0.0);
  if (!xs.empty()) {
    dispatch(xs, [&](auto s_tag, auto c_tag) {
      at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t lo, int64_t hi) {
        for (int64_t s = lo; s < hi; ++s) body(s_tag, c_tag, spans[s], &part[s * K]);
      });
      return 0;
    });
  }
  return gather_sums(spans, part, xs.size(), K);
}

// The skip flag of a step: an undefined/None tensor means "no skip possible".
bool skipped(const c10::optional<at::Tensor>& skip) {
  if (!skip.has_value() || !skip->defined()) return false;
  TORCH_CHECK(skip->device().is_cpu() && skip->numel() == 1 && skip->scalar_type() == at::kBool,
              "amllm cpu kernels: skip must be a 1-element CPU bool tensor");
  return *skip->data_ptr<bool>();  // the memory itself: no dispatch, no Python
}

}  // namespace

// Per-tensor scalars: c1, isc2 (1/sqrt(1 - b2^t)), beta, coef. Scalar coefficients such as
// 1 - b2 are formed in double before the cast: 1 - float(0.99) is off by 1e-6 relative.
at::Tensor adamw_pass1(const TensorList& xs, const TensorList& gs, const TensorList& ds, const TensorList& vs,
                       const std::vector<double>& c1, const std::vector<double>& isc2, double b2, double eps,
                       double lam, bool with_x) {
  check_lists({&xs, &gs, &ds, &vs}, {&c1, &isc2});
  return over_chunks<5>(xs, [&](auto s_tag, auto c_tag, const Span& sp, double* out) {
    using S = decltype(s_tag);
    using C = decltype(c_tag);
    const int64_t k = sp.k;
    auto run = with_x ? adamw_pass1_span<S, C, true> : adamw_pass1_span<S, C, false>;
    run(ptr<S>(xs[k]), ptr<S>(gs[k]), ptr<S>(ds[k]), ptr<S>(vs[k]), sp.begin, sp.end, C(c1[k]), C(b2),
        C(1.0 - b2), C(eps), C(lam), C(isc2[k]), out);
  });
}

void adamw_pass2(const TensorList& xs, const TensorList& gs, const TensorList& ds, const TensorList& vs,
                 const std::vector<double>& c1, const std::vector<double>& beta, const std::vector<double>& isc2,
                 double b2, double eps, double lam, double lr, double wd, const c10::optional<at::Tensor>& skip) {
  check_lists({&xs, &gs, &ds, &vs}, {&c1, &beta, &isc2});
  if (skipped(skip)) return;
  over_chunks<0>(xs, [&](auto s_tag, auto c_tag, const Span& sp, double*) {
    using S = decltype(s_tag);
    using C = decltype(c_tag);
    const int64_t k = sp.k;
    adamw_pass2_span<S, C>(ptr<S>(xs[k]), ptr<S>(gs[k]), ptr<S>(ds[k]), ptr<S>(vs[k]), sp.begin, sp.end, C(c1[k]),
                           C(beta[k]), C(1.0 - beta[k]), C(b2), C(1.0 - b2), C(eps), C(lam), C(isc2[k]), C(lr),
                           C(1.0 - lr * wd));
  });
}

at::Tensor sgd_pass1(const TensorList& xs, const TensorList& gs, const TensorList& ds, double wd) {
  check_lists({&xs, &gs, &ds}, {});
  return over_chunks<3>(xs, [&](auto s_tag, auto c_tag, const Span& sp, double* out) {
    using S = decltype(s_tag);
    using C = decltype(c_tag);
    auto run = wd != 0.0 ? sgd_pass1_span<S, C, true> : sgd_pass1_span<S, C, false>;
    run(ptr<S>(xs[sp.k]), ptr<S>(gs[sp.k]), ptr<S>(ds[sp.k]), sp.begin, sp.end, C(wd), out);
  });
}

void sgd_pass2(const TensorList& xs, const TensorList& gs, const TensorList& ds, const std::vector<double>& coef,
               double lr, double wd, const c10::optional<at::Tensor>& skip) {
  check_lists({&xs, &gs, &ds}, {&coef});
  if (skipped(skip)) return;
  over_chunks<0>(xs, [&](auto s_tag, auto c_tag, const Span& sp, double*) {
    using S = decltype(s_tag);
    using C = decltype(c_tag);
    sgd_pass2_span<S, C>(ptr<S>(xs[sp.k]), ptr<S>(gs[sp.k]), ptr<S>(ds[sp.k]), sp.begin, sp.end, C(coef[sp.k]),
                         C(lr), C(wd));
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adamw_pass1", &adamw_pass1, "AM-AdamW pass 1 over a tensor list: [n, 5] float64 sums (v not written)");
  m.def("adamw_pass2", &adamw_pass2, "AM-AdamW pass 2 over a tensor list: v, d and x in place (unless skip)");
  m.def("sgd_pass1", &sgd_pass1, "AM-SGD pass 1 over a tensor list: [n, 3] float64 sums");
  m.def("sgd_pass2", &sgd_pass2, "AM-SGD pass 2 over a tensor list: d and x in place (unless skip)");
}
