// CPU fast path of tripartite decode attention (RetroInfer-style) over a WaveIndex.
//
// Same semantics as vllm_retro.wave_index.WaveIndex.attend. Each cluster's estimated
// log-mass is  ln size + q.c*scale + min(scale^2/2 * sum_d q_d^2 key_var_d, cap)
// (vllm_retro.attention.cluster_log_mass, cap VARIANCE_CORRECTION_CAP). Per KV head,
// clusters are ranked by its softmax over clusters, summed over the GQA group (ties:
// lower cluster index first, as the reference's stable argsort); the top k_ret clusters
// are attended exactly together with sinks and tail, the next n_est are estimated (that
// log-mass as logit over value value_sum/size), and the parts are merged in one softmax
// (equal to the reference's log-sum-exp merge).
//
// Work per KV head (parallel over KV heads):
//   1. logits of sinks + tail (exact),
//   2. estimated log-mass of every cluster (centroid logit, ln size, capped variance
//      term) and the group-summed score,
//   3. partial selection (nth_element / partial_sort) of the top k_ret + n_est; k_ret is
//      n_ret (fixed fractions), a per-head k_ret tensor, or, with error_bound > 0, the
//      smallest exact set of bounded outside mass (WaveIndex._bounded_retrieval); with
//      the error rank the band (top n_ret + n_est by score) is re-sorted by each
//      cluster's expected estimation error and its first n_ret are exact
//      (WaveIndex._error_ranked, retrieval_rank "error"),
//   4. logits of the retrieved clusters' contiguous token ranges (only those tokens
//      are read),
//   5. one softmax over exact tokens and estimated clusters, then the weighted sum of
//      values / cluster mean values (plus, with the value correction, each estimated
//      cluster's scale (q . sigma u) w per query head).
// Accumulation in float32 (float64 for float64 KV). Inner loops run over the
// contiguous head dim so the compiler vectorises them.

#include "ops.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace vllm_retro {
namespace {

// Hot loops live in small leaf functions (logits of a run of rows, weighted sum of a
// run of rows) built with always-inlined helpers. On x86-64 Linux each leaf is also
// cloned for AVX2+FMA and AVX-512 (GCC/clang target_clones, picked at load time), so
// the baseline -O3 build still uses the wide vectors of the machine it runs on.
#define RETRO_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && \
    !defined(RETRO_NO_CLONES)
#define RETRO_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) \
  __attribute__((noinline))
#else
#define RETRO_CLONES __attribute__((noinline))
#endif

// ---------------------------------------------------------------- element loads
RETRO_INLINE float to_acc(float x) { return x; }
RETRO_INLINE double to_acc(double x) { return x; }
RETRO_INLINE float to_acc(c10::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}
RETRO_INLINE float to_acc(c10::Half x) { return static_cast<float>(x); }

// Row `p` (D elements) as acc_t: the row itself when no conversion is needed, else
// converted into `buf`.
template <typename A, typename T>
RETRO_INLINE const A* row_as(const T* p, A* buf, int64_t D) {
  if constexpr (std::is_same_v<A, T>) {
    (void)buf;
    (void)D;
    return p;
  } else {
    for (int64_t d = 0; d < D; ++d) buf[d] = to_acc(p[d]);
    return buf;
  }
}

// Dot product with kLanes independent partial sums: the fixed-width inner loop
// vectorises without reassociation and keeps several add chains in flight (a single
// vector accumulator would be bound by the add latency).
template <typename A>
RETRO_INLINE A dot(const A* __restrict a, const A* __restrict b, int64_t D) {
  constexpr int kLanes = 64 / sizeof(A);  // 16 floats / 8 doubles
  A part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += a[d + j] * b[d + j];
  A s = 0;
  for (int j = 0; j < kLanes; ++j) s += part[j];
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

template <typename A>
RETRO_INLINE void axpy(A* __restrict y, A w, const A* __restrict x, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) y[d] += w * x[d];
}

// out[t * G + g] = scale * q[g] . rows[t], t < n (rows `stride` elements apart).
template <typename T, typename A>
RETRO_INLINE void logits_rows_impl(const A* q, int64_t G, const T* rows, int64_t stride,
                                   int64_t n, int64_t D, A scale, A* buf, A* out) {
  for (int64_t t = 0; t < n; ++t) {
    const A* row = row_as<A>(rows + t * stride, buf, D);
    for (int64_t g = 0; g < G; ++g) out[t * G + g] = dot(q + g * D, row, D) * scale;
  }
}

// acc[g] += w[t * G + g] * rows[t], t < n.
template <typename T, typename A>
RETRO_INLINE void accum_rows_impl(const A* w, int64_t G, const T* rows, int64_t stride,
                                  int64_t n, int64_t D, A* buf, A* acc) {
  for (int64_t t = 0; t < n; ++t) {
    const A* row = row_as<A>(rows + t * stride, buf, D);
    for (int64_t g = 0; g < G; ++g)
      if (w[t * G + g] != A(0)) axpy(acc + g * D, w[t * G + g], row, D);
  }
}

template <typename T>
struct Leaf;

#define RETRO_LEAF(T, A, SUF)                                                            \
  RETRO_CLONES void logits_rows_##SUF(const A* q, int64_t G, const T* rows,              \
                                      int64_t stride, int64_t n, int64_t D, A scale,     \
                                      A* buf, A* out) {                                  \
    logits_rows_impl<T, A>(q, G, rows, stride, n, D, scale, buf, out);                   \
  }                                                                                      \
  RETRO_CLONES void accum_rows_##SUF(const A* w, int64_t G, const T* rows,               \
                                     int64_t stride, int64_t n, int64_t D, A* buf,       \
                                     A* acc) {                                           \
    accum_rows_impl<T, A>(w, G, rows, stride, n, D, buf, acc);                           \
  }                                                                                      \
  template <>                                                                            \
  struct Leaf<T> {                                                                       \
    static void logits(const A* q, int64_t G, const T* rows, int64_t stride, int64_t n,  \
                       int64_t D, A scale, A* buf, A* out) {                             \
      logits_rows_##SUF(q, G, rows, stride, n, D, scale, buf, out);                      \
    }                                                                                    \
    static void accum(const A* w, int64_t G, const T* rows, int64_t stride, int64_t n,   \
                      int64_t D, A* buf, A* acc) {                                       \
      accum_rows_##SUF(w, G, rows, stride, n, D, buf, acc);                              \
    }                                                                                    \
  };

RETRO_LEAF(float, float, f32)
RETRO_LEAF(c10::BFloat16, float, bf16)
RETRO_LEAF(c10::Half, float, f16)
RETRO_LEAF(double, double, f64)
#undef RETRO_LEAF

// Default cap (nats) of the variance term of a cluster's log-mass; equal to
// vllm_retro.attention.VARIANCE_CORRECTION_CAP (RetroConfig.variance_cap).
constexpr double kVarianceCorrectionCap = 2.0;

// ---------------------------------------------------------------- arguments
struct View3 {  // [H, T, D] with unit stride in D
  const void* data = nullptr;
  int64_t sh = 0, st = 0, n = 0;
};

View3 view3(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.size(1)};
}

template <typename T, typename A>
struct Ctx {
  const A* q = nullptr;  // [Hq, D] contiguous
  View3 sk, sv, tk, tv, k, v, cent, vsum, kvar;
  View3 vc_su, vc_w;       // value correction's sigma u and w [H, C, D]; data null: off
  bool error_rank = false; // retrieval_rank "error" (fixed budget only)
  const int64_t* sizes = nullptr;
  const int64_t* starts = nullptr;
  int64_t sz_sh = 0, sz_sc = 0, st_sh = 0, st_sc = 0;
  const int64_t* k_ret = nullptr;  // [H] or null
  int64_t k_ret_stride = 0;
  int64_t G = 1, D = 0, C = 0, n_ret = 0, n_est = 0, max_ret = -1;
  double error_bound = 0.0;
  double var_cap = kVarianceCorrectionCap;
  double bound_margin = -1.0;  // >= 0: one-sided outside-mass estimate (bounded mode)
  A scale = 1;
  A* out = nullptr;        // [Hq, D] contiguous
  int64_t* stats = nullptr;  // [H, 3] contiguous
};

template <typename T>
inline const T* row_ptr(const View3& v, int64_t h, int64_t t) {
  return static_cast<const T*>(v.data) + h * v.sh + t * v.st;
}

struct Range {  // n contiguous-by-stride tokens of one head
  int64_t begin;  // first token index in its tensor
  int64_t n;
  int which;      // 0 sinks, 1 tail, 2 clustered
};

template <typename T, typename A>
void run_head(const Ctx<T, A>& c, int64_t h) {
  const int64_t G = c.G, D = c.D, C = c.C;
  const A* qh = c.q + h * G * D;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  std::vector<A> buf(D);

  const View3* kv_k[3] = {&c.sk, &c.tk, &c.k};
  const View3* kv_v[3] = {&c.sv, &c.tv, &c.v};

  std::vector<Range> ranges;
  ranges.reserve(2 + 64);
  std::vector<A> lg;  // exact logits, token-major [T_exact, G]

  auto range_logits = [&](const Range& r) {
    const size_t off = lg.size();
    lg.resize(off + static_cast<size_t>(r.n * G));
    const View3& kv = *kv_k[r.which];
    Leaf<T>::logits(qh, G, row_ptr<T>(kv, h, r.begin), kv.st, r.n, D, c.scale, buf.data(),
                    lg.data() + off);
  };

  // 1. steady zone: sinks + tail.
  if (c.sk.n > 0) ranges.push_back({0, c.sk.n, 0});
  if (c.tk.n > 0) ranges.push_back({0, c.tk.n, 1});
  for (const Range& r : ranges) range_logits(r);
  const size_t n_steady = lg.size();

  // 2.-3. ranking and selection.
  std::vector<A> cl;         // centroid logits, cluster-major [C, G]
  std::vector<int64_t> est;  // estimated cluster ids
  int64_t k1 = 0, tok_ret = 0, tok_est = 0;
  if (C > 0) {
    const int64_t* sizes = c.sizes + h * c.sz_sh;
    const int64_t* starts = c.starts + h * c.st_sh;
    cl.resize(static_cast<size_t>(C * G));
    Leaf<A>::logits(qh, G, row_ptr<A>(c.cent, h, 0), c.cent.st, C, D, c.scale, buf.data(),
                    cl.data());
    // Second-order term: (scale^2 / 2) * sum_d q_d^2 var_d, capped.
    std::vector<A> q2(static_cast<size_t>(G * D)), corr(static_cast<size_t>(C * G));
    for (int64_t i = 0; i < G * D; ++i) q2[i] = qh[i] * qh[i];
    Leaf<A>::logits(q2.data(), G, row_ptr<A>(c.kvar, h, 0), c.kvar.st, C, D,
                    A(0.5) * c.scale * c.scale, buf.data(), corr.data());
    const A cap = static_cast<A>(c.var_cap);
    const bool one_sided = c.error_bound > 0 && c.k_ret == nullptr && c.bound_margin >= 0;
    // One-sided bound (WaveIndex._one_sided_outside): first-order log-mass (lower
    // bound) and uncapped second-order log-mass + margin (upper estimate).
    std::vector<A> lo, up;
    if (one_sided) {
      lo.resize(static_cast<size_t>(C * G));
      up.resize(static_cast<size_t>(C * G));
    }
    for (int64_t ci = 0; ci < C; ++ci) {
      const A ls = std::log(static_cast<A>(sizes[ci * c.sz_sc]));
      for (int64_t g = 0; g < G; ++g) {
        if (one_sided) {
          lo[ci * G + g] = cl[ci * G + g] + ls;
          up[ci * G + g] = lo[ci * G + g] + corr[ci * G + g] + static_cast<A>(c.bound_margin);
        }
        cl[ci * G + g] += ls + std::min(corr[ci * G + g], cap);
      }
    }
    // Group-summed softmax score; a query head whose logits are all -inf adds 0
    // (the reference's nan_to_num).
    std::vector<A> score(C, A(0)), e(C);
    std::vector<A> clse(G, kNegInf);  // logsumexp over clusters per query head
    for (int64_t g = 0; g < G; ++g) {
      A m = kNegInf;
      for (int64_t ci = 0; ci < C; ++ci) m = std::max(m, cl[ci * G + g]);
      if (!(m > kNegInf)) continue;
      A s = 0;
      for (int64_t ci = 0; ci < C; ++ci) {
        e[ci] = std::exp(cl[ci * G + g] - m);
        s += e[ci];
      }
      clse[g] = m + std::log(s);
      const A inv = A(1) / s;
      for (int64_t ci = 0; ci < C; ++ci) score[ci] += e[ci] * inv;
    }
    for (int64_t ci = 0; ci < C; ++ci)
      if (std::isnan(score[ci])) score[ci] = 0;

    std::vector<int64_t> idx(C);
    for (int64_t ci = 0; ci < C; ++ci) idx[ci] = ci;
    auto better = [&score](int64_t a, int64_t b) {
      return score[a] > score[b] || (score[a] == score[b] && a < b);
    };

    // Per query head, the steady part's logsumexp and the total over steady part and
    // clusters: the denominators of a cluster's estimated share of the attention.
    auto steady_and_total = [&](std::vector<A>& slse, std::vector<A>& total) {
      slse.assign(G, kNegInf);
      total.assign(G, kNegInf);
      for (int64_t g = 0; g < G; ++g) {
        A m = kNegInf;
        for (size_t i = g; i < n_steady; i += G) m = std::max(m, lg[i]);
        if (m > kNegInf) {
          A s = 0;
          for (size_t i = g; i < n_steady; i += G) s += std::exp(lg[i] - m);
          slse[g] = m + std::log(s);
        }
        const A a = clse[g], b = slse[g];
        const A mx = std::max(a, b);
        if (mx > kNegInf) total[g] = mx + std::log1p(std::exp(std::min(a, b) - mx));
      }
    };

    if (c.k_ret != nullptr) {
      k1 = std::min<int64_t>(c.k_ret[h * c.k_ret_stride], C);
    } else if (c.error_bound > 0) {
      // Accuracy-bounded exact set (WaveIndex._bounded_retrieval).
      const int64_t n_min = std::min(c.n_ret, C);
      const int64_t cap = std::max(n_min, c.max_ret < 0 ? C : std::min(c.max_ret, C));
      std::partial_sort(idx.begin(), idx.begin() + cap, idx.end(), better);
      std::vector<A> slse, total, base(G);
      steady_and_total(slse, total);
      for (int64_t g = 0; g < G; ++g)
        base[g] = A(1) - std::exp(slse[g] - total[g]);  // NaN when nothing has mass
      int64_t first_ok = C;
      if (!one_sided) {
        std::vector<double> cum(G, 0.0);
        for (int64_t r = 0; r < cap; ++r) {
          const int64_t ci = idx[r];
          bool ok = true;
          for (int64_t g = 0; g < G; ++g) {
            cum[g] += static_cast<double>(std::exp(cl[ci * G + g] - total[g]));
            const A outside = base[g] - static_cast<A>(cum[g]);
            if (!(outside <= static_cast<A>(c.error_bound))) ok = false;
          }
          if (ok) {
            first_ok = r + 1;
            break;
          }
        }
      } else {
        // out(k) = sum of exp(up) over ranks >= k (a suffix: the unsorted rest beyond
        // the cap first, then ranks cap-1 .. k), in(k) = sum of exp(lo) over ranks < k;
        // outside fraction out / (steady + in + out), all in float64 relative to the
        // largest of exp(up) and the steady lse (0 when neither is finite).
        std::vector<double> m(G), s_exp(G), suffix(static_cast<size_t>((cap + 1) * G), 0.0);
        for (int64_t g = 0; g < G; ++g) {
          double mx = static_cast<double>(slse[g]);
          for (int64_t ci = 0; ci < C; ++ci) mx = std::max(mx, static_cast<double>(up[ci * G + g]));
          m[g] = std::isfinite(mx) ? mx : 0.0;
          s_exp[g] = std::exp(static_cast<double>(slse[g]) - m[g]);
          double rest = 0.0;
          for (int64_t r = cap; r < C; ++r)
            rest += std::exp(static_cast<double>(up[idx[r] * G + g]) - m[g]);
          suffix[cap * G + g] = rest;
          for (int64_t r = cap - 1; r >= 0; --r)
            suffix[r * G + g] = suffix[(r + 1) * G + g] +
                                std::exp(static_cast<double>(up[idx[r] * G + g]) - m[g]);
        }
        std::vector<double> inside(G, 0.0);
        for (int64_t r = 0; r < cap; ++r) {
          const int64_t ci = idx[r];
          bool ok = true;
          for (int64_t g = 0; g < G; ++g) {
            inside[g] += std::exp(static_cast<double>(lo[ci * G + g]) - m[g]);
            const double out = suffix[(r + 1) * G + g];
            const double outside = out / (s_exp[g] + inside[g] + out);
            if (!(outside <= c.error_bound)) ok = false;
          }
          if (ok) {
            first_ok = r + 1;
            break;
          }
        }
      }
      k1 = std::min(std::max(first_ok, n_min), cap);
    } else {
      k1 = std::min(c.n_ret, C);
    }
    const int64_t k2 = std::min(k1 + c.n_est, C);
    if (c.error_rank) {
      // The band in score order, then stably re-sorted by the expected estimation
      // error sum_g m_g t_g: m_g the cluster's share of query head g's attention
      // (steady part in the total), t_g its uncapped variance term.
      std::partial_sort(idx.begin(), idx.begin() + k2, idx.end(), better);
      std::vector<A> slse, total;
      steady_and_total(slse, total);
      std::vector<A> err(C, A(0));
      for (int64_t r = 0; r < k2; ++r) {
        const int64_t ci = idx[r];
        A s = 0;
        for (int64_t g = 0; g < G; ++g) {
          const A m = std::exp(cl[ci * G + g] - total[g]);
          if (!std::isnan(m)) s += m * corr[ci * G + g];
        }
        err[ci] = s;
      }
      std::stable_sort(idx.begin(), idx.begin() + k2,
                       [&err](int64_t a, int64_t b) { return err[a] > err[b]; });
    } else {
      if (k1 > 0 && k1 < C) std::nth_element(idx.begin(), idx.begin() + k1, idx.end(), better);
      if (k2 > k1 && k2 < C)
        std::nth_element(idx.begin() + k1, idx.begin() + k2, idx.end(), better);
    }

    // 4. retrieved clusters, in storage order.
    std::sort(idx.begin(), idx.begin() + k1);
    for (int64_t r = 0; r < k1; ++r) {
      const int64_t ci = idx[r];
      const int64_t n = sizes[ci * c.sz_sc];
      tok_ret += n;
      if (n > 0) {
        Range rg{starts[ci * c.st_sc], n, 2};
        ranges.push_back(rg);
        range_logits(rg);
      }
    }
    for (int64_t r = k1; r < k2; ++r) {
      const int64_t ci = idx[r];
      const int64_t n = sizes[ci * c.sz_sc];
      tok_est += n;
      if (n > 0) est.push_back(ci);  // empty clusters carry no mass
    }
  }

  // 5. one softmax over exact tokens and estimated clusters.
  const int64_t n_exact = static_cast<int64_t>(lg.size()) / G;
  const int64_t n_e = static_cast<int64_t>(est.size());
  std::vector<A> el(static_cast<size_t>(n_e * G));
  for (int64_t j = 0; j < n_e; ++j)
    for (int64_t g = 0; g < G; ++g) el[j * G + g] = cl[est[j] * G + g];

  std::vector<A> acc(static_cast<size_t>(G * D), A(0)), denom(G, A(0));
  for (int64_t g = 0; g < G; ++g) {
    A m = kNegInf;
    for (int64_t i = 0; i < n_exact; ++i) m = std::max(m, lg[i * G + g]);
    for (int64_t j = 0; j < n_e; ++j) m = std::max(m, el[j * G + g]);
    A s = 0;
    if (m > kNegInf) {
      for (int64_t i = 0; i < n_exact; ++i) {
        const A w = std::exp(lg[i * G + g] - m);
        lg[i * G + g] = w;
        s += w;
      }
      for (int64_t j = 0; j < n_e; ++j) {
        const A w = std::exp(el[j * G + g] - m);
        el[j * G + g] = w;
        s += w;
      }
    } else {  // nothing carries mass: output zeros, as the reference
      for (int64_t i = 0; i < n_exact; ++i) lg[i * G + g] = 0;
      for (int64_t j = 0; j < n_e; ++j) el[j * G + g] = 0;
    }
    denom[g] = s;
  }

  const A* w = lg.data();
  for (const Range& r : ranges) {
    const View3& kv = *kv_v[r.which];
    Leaf<T>::accum(w, G, row_ptr<T>(kv, h, r.begin), kv.st, r.n, D, buf.data(), acc.data());
    w += r.n * G;
  }
  if (n_e > 0) {
    const int64_t* sizes = c.sizes + h * c.sz_sh;
    std::vector<A> vc_coef(c.vc_su.data != nullptr ? G : 0);
    for (int64_t j = 0; j < n_e; ++j) {
      // The cluster's mean value value_sum / size, weighted: (w / size) * value_sum.
      const A inv_sz = A(1) / static_cast<A>(std::max<int64_t>(sizes[est[j] * c.sz_sc], 1));
      for (int64_t g = 0; g < G; ++g) el[j * G + g] *= inv_sz;
      Leaf<A>::accum(el.data() + j * G, G, row_ptr<A>(c.vsum, h, est[j]), 0, 1, D, buf.data(),
                     acc.data());
      if (c.vc_su.data != nullptr) {
        // + weight_g * scale (q_g . sigma u) w: the mean value's first-order change
        // with the query (the weight undoes the 1 / size above).
        std::vector<A>& cf = vc_coef;
        Leaf<A>::logits(qh, G, row_ptr<A>(c.vc_su, h, est[j]), 0, 1, D, c.scale, buf.data(),
                        cf.data());
        const A sz = static_cast<A>(std::max<int64_t>(sizes[est[j] * c.sz_sc], 1));
        for (int64_t g = 0; g < G; ++g) cf[g] *= el[j * G + g] * sz;
        Leaf<A>::accum(cf.data(), G, row_ptr<A>(c.vc_w, h, est[j]), 0, 1, D, buf.data(),
                       acc.data());
      }
    }
  }

  A* oh = c.out + h * G * D;
  for (int64_t g = 0; g < G; ++g) {
    const A inv = denom[g] > 0 ? A(1) / denom[g] : A(0);
    for (int64_t d = 0; d < D; ++d) oh[g * D + d] = acc[g * D + d] * inv;
  }
  c.stats[h * 3 + 0] = k1;
  c.stats[h * 3 + 1] = tok_ret;
  c.stats[h * 3 + 2] = tok_est;
}

// ---------------------------------------------------------------- validation
const char* kOp = "retro_decode_attention: ";

void check_kv(const at::Tensor& t, const char* name, int64_t H, int64_t D,
              at::ScalarType dt, const char* dt_what = "the KV dtype") {
  TORCH_CHECK(t.device().is_cpu(), kOp, name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == H && t.size(2) == D, kOp, name,
              " must be [", H, ", n, ", D, "] (num_kv_heads, tokens, head_dim), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, kOp, name, " must have ", dt_what, " ", dt, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == 0 || t.stride(2) == 1, kOp, name,
              " must be contiguous in its last dim (head_dim), got strides ", t.strides());
}

void check_pair(const at::Tensor& k, const at::Tensor& v, const char* kn, const char* vn) {
  TORCH_CHECK(k.sizes() == v.sizes(), kOp, kn, " and ", vn, " must have the same shape, got ",
              k.sizes(), " and ", v.sizes());
}

struct Checked {
  int64_t H, Hq, D, C, N;
  at::ScalarType kv_dtype, acc_dtype;
};

Checked check_inputs(const at::Tensor& query, const at::Tensor& sink_keys,
                     const at::Tensor& sink_values, const at::Tensor& tail_keys,
                     const at::Tensor& tail_values, const at::Tensor& keys,
                     const at::Tensor& values, const at::Tensor& centroids,
                     const at::Tensor& value_sums, const at::Tensor& key_vars,
                     const at::Tensor& sizes, const at::Tensor& starts, int64_t n_ret,
                     int64_t n_est, double scale,
                     const at::Tensor& out, const std::optional<at::Tensor>& k_ret,
                     double error_bound, int64_t max_ret, double variance_cap,
                     double bound_margin, const std::optional<at::Tensor>& vc_su,
                     const std::optional<at::Tensor>& vc_w, bool error_rank) {
  TORCH_CHECK(keys.dim() == 3, kOp, "keys must be [num_kv_heads, tokens, head_dim], got ",
              keys.sizes());
  const int64_t H = keys.size(0), D = keys.size(2);
  const at::ScalarType kv = keys.scalar_type();
  TORCH_CHECK(kv == at::kFloat || kv == at::kBFloat16 || kv == at::kHalf || kv == at::kDouble,
              kOp, "KV dtype must be float32, bfloat16, float16 or float64, got ", kv);
  const at::ScalarType acc = kv == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(H > 0, kOp, "num_kv_heads must be > 0");
  TORCH_CHECK(D > 0, kOp, "head_dim must be > 0");

  TORCH_CHECK(query.device().is_cpu(), kOp, "query must be a CPU tensor, got ",
              query.device());
  TORCH_CHECK(query.dim() == 2 && query.size(1) == D, kOp, "query must be [num_q_heads, ", D,
              "], got ", query.sizes());
  TORCH_CHECK(at::isFloatingType(query.scalar_type()), kOp,
              "query must be a floating tensor, got ", query.scalar_type());
  const int64_t Hq = query.size(0);
  TORCH_CHECK(Hq > 0 && Hq % H == 0, kOp, "num_q_heads (", Hq,
              ") must be a positive multiple of num_kv_heads (", H, ")");

  check_kv(keys, "keys", H, D, kv);
  check_kv(values, "values", H, D, kv);
  check_pair(keys, values, "keys", "values");
  check_kv(sink_keys, "sink_keys", H, D, kv);
  check_kv(sink_values, "sink_values", H, D, kv);
  check_pair(sink_keys, sink_values, "sink_keys", "sink_values");
  check_kv(tail_keys, "tail_keys", H, D, kv);
  check_kv(tail_values, "tail_values", H, D, kv);
  check_pair(tail_keys, tail_values, "tail_keys", "tail_values");

  TORCH_CHECK(centroids.dim() == 3 && centroids.size(0) == H && centroids.size(2) == D, kOp,
              "centroids must be [", H, ", C, ", D, "], got ", centroids.sizes());
  const int64_t C = centroids.size(1);
  const char* acc_what = "the compute dtype (float64 for float64 KV, else float32)";
  check_kv(centroids, "centroids", H, D, acc, acc_what);
  check_kv(value_sums, "value_sums", H, D, acc, acc_what);
  check_pair(centroids, value_sums, "centroids", "value_sums");
  check_kv(key_vars, "key_vars", H, D, acc, acc_what);
  check_pair(centroids, key_vars, "centroids", "key_vars");
  for (const auto* p : {&sizes, &starts}) {
    const char* name = p == &sizes ? "sizes" : "starts";
    TORCH_CHECK(p->device().is_cpu(), kOp, name, " must be a CPU tensor");
    TORCH_CHECK(p->dim() == 2 && p->size(0) == H && p->size(1) == C, kOp, name, " must be [",
                H, ", ", C, "] (num_kv_heads, clusters), got ", p->sizes());
    TORCH_CHECK(p->scalar_type() == at::kLong, kOp, name, " must be int64, got ",
                p->scalar_type());
  }
  const int64_t N = keys.size(1);
  if (C > 0) {
    const int64_t* sz = sizes.data_ptr<int64_t>();
    const int64_t* st = starts.data_ptr<int64_t>();
    for (int64_t h = 0; h < H; ++h)
      for (int64_t ci = 0; ci < C; ++ci) {
        const int64_t n = sz[h * sizes.stride(0) + ci * sizes.stride(1)];
        const int64_t s = st[h * starts.stride(0) + ci * starts.stride(1)];
        TORCH_CHECK(n >= 0 && s >= 0 && s <= N && n <= N - s, kOp, "cluster ", ci,
                    " of kv head ", h, " (start ", s, ", size ", n,
                    ") lies outside keys' ", N, " tokens");
      }
  }

  TORCH_CHECK(n_ret >= 0 && n_est >= 0, kOp, "n_ret and n_est must be >= 0, got ", n_ret,
              " and ", n_est);
  TORCH_CHECK(std::isfinite(scale), kOp, "scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(error_bound) && error_bound >= 0 && error_bound <= 1, kOp,
              "error_bound must be in [0, 1] (0: fixed budget), got ", error_bound);
  TORCH_CHECK(!(k_ret.has_value() && error_bound > 0), kOp,
              "pass either k_ret or error_bound, not both");
  (void)max_ret;
  TORCH_CHECK(std::isfinite(variance_cap) && variance_cap >= 0, kOp,
              "variance_cap must be finite and >= 0, got ", variance_cap);
  TORCH_CHECK(std::isfinite(bound_margin), kOp, "bound_margin must be finite (< 0: off), got ",
              bound_margin);
  TORCH_CHECK(vc_su.has_value() == vc_w.has_value(), kOp,
              "vc_su and vc_w (the value correction's pair) must be given together");
  if (vc_su.has_value()) {
    check_kv(*vc_su, "vc_su", H, D, acc, acc_what);
    check_kv(*vc_w, "vc_w", H, D, acc, acc_what);
    TORCH_CHECK(vc_su->size(1) == C && vc_w->size(1) == C, kOp,
                "vc_su and vc_w must have one row per cluster (", C, "), got ",
                vc_su->sizes(), " and ", vc_w->sizes());
  }
  TORCH_CHECK(!(error_rank && (k_ret.has_value() || error_bound > 0)), kOp,
              "error_rank applies to the fixed budget (no k_ret, no error_bound)");
  if (k_ret.has_value()) {
    const at::Tensor& kr = *k_ret;
    TORCH_CHECK(kr.device().is_cpu() && kr.dim() == 1 && kr.size(0) == H &&
                    kr.scalar_type() == at::kLong,
                kOp, "k_ret must be a CPU int64 tensor [", H, "], got ", kr.scalar_type(),
                " ", kr.sizes(), " on ", kr.device());
    const int64_t* p = kr.data_ptr<int64_t>();
    for (int64_t h = 0; h < H; ++h)
      TORCH_CHECK(p[h * kr.stride(0)] >= 0, kOp, "k_ret must be >= 0, got ",
                  p[h * kr.stride(0)], " for kv head ", h);
  }

  TORCH_CHECK(out.device().is_cpu(), kOp, "out must be a CPU tensor, got ", out.device());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == Hq && out.size(1) == D, kOp, "out must be [",
              Hq, ", ", D, "], got ", out.sizes());
  TORCH_CHECK(at::isFloatingType(out.scalar_type()), kOp, "out must be a floating tensor, got ",
              out.scalar_type());
  return {H, Hq, D, C, N, kv, acc};
}

template <typename T, typename A>
void launch(const Checked& ck, const at::Tensor& q, const at::Tensor& sink_keys,
            const at::Tensor& sink_values, const at::Tensor& tail_keys,
            const at::Tensor& tail_values, const at::Tensor& keys, const at::Tensor& values,
            const at::Tensor& centroids, const at::Tensor& value_sums,
            const at::Tensor& key_vars, const at::Tensor& sizes, const at::Tensor& starts,
            int64_t n_ret, int64_t n_est, double scale,
            at::Tensor& out_acc, at::Tensor& stats, const std::optional<at::Tensor>& k_ret,
            double error_bound, int64_t max_ret, double variance_cap, double bound_margin,
            const std::optional<at::Tensor>& vc_su, const std::optional<at::Tensor>& vc_w,
            bool error_rank) {
  Ctx<T, A> c;
  c.q = q.data_ptr<A>();
  c.sk = view3(sink_keys);
  c.sv = view3(sink_values);
  c.tk = view3(tail_keys);
  c.tv = view3(tail_values);
  c.k = view3(keys);
  c.v = view3(values);
  c.cent = view3(centroids);
  c.vsum = view3(value_sums);
  c.kvar = view3(key_vars);
  if (vc_su.has_value()) {
    c.vc_su = view3(*vc_su);
    c.vc_w = view3(*vc_w);
  }
  c.error_rank = error_rank;
  c.sizes = sizes.data_ptr<int64_t>();
  c.starts = starts.data_ptr<int64_t>();
  c.sz_sh = sizes.stride(0);
  c.sz_sc = sizes.stride(1);
  c.st_sh = starts.stride(0);
  c.st_sc = starts.stride(1);
  if (k_ret.has_value()) {
    c.k_ret = k_ret->data_ptr<int64_t>();
    c.k_ret_stride = k_ret->stride(0);
  }
  c.G = ck.Hq / ck.H;
  c.D = ck.D;
  c.C = ck.C;
  c.n_ret = n_ret;
  c.n_est = n_est;
  c.max_ret = max_ret;
  c.error_bound = error_bound;
  c.var_cap = variance_cap;
  c.bound_margin = bound_margin;
  c.scale = static_cast<A>(scale);
  c.out = out_acc.data_ptr<A>();
  c.stats = stats.data_ptr<int64_t>();
  at::parallel_for(0, ck.H, 1, [&](int64_t b, int64_t e) {
    for (int64_t h = b; h < e; ++h) run_head<T, A>(c, h);
  });
}

}  // namespace

at::Tensor retro_decode_attention_cpu(
    const at::Tensor& query, const at::Tensor& sink_keys, const at::Tensor& sink_values,
    const at::Tensor& tail_keys, const at::Tensor& tail_values, const at::Tensor& keys,
    const at::Tensor& values, const at::Tensor& centroids, const at::Tensor& value_sums,
    const at::Tensor& key_vars, const at::Tensor& sizes, const at::Tensor& starts,
    int64_t n_ret, int64_t n_est,
    double scale, at::Tensor& out, const std::optional<at::Tensor>& k_ret,
    double error_bound, int64_t max_ret, double variance_cap, double bound_margin,
    const std::optional<at::Tensor>& vc_su, const std::optional<at::Tensor>& vc_w,
    bool error_rank) {
  const Checked ck = check_inputs(query, sink_keys, sink_values, tail_keys, tail_values, keys,
                                  values, centroids, value_sums, key_vars, sizes, starts, n_ret,
                                  n_est, scale, out, k_ret, error_bound, max_ret, variance_cap,
                                  bound_margin, vc_su, vc_w, error_rank);
  const at::Tensor q = query.to(ck.acc_dtype).contiguous();
  const bool direct = out.scalar_type() == ck.acc_dtype && out.is_contiguous();
  at::Tensor out_acc = direct ? out : at::empty({ck.Hq, ck.D}, q.options());
  at::Tensor stats = at::empty({ck.H, 3}, query.options().dtype(at::kLong));

#define RETRO_LAUNCH(T, A)                                                                    \
  launch<T, A>(ck, q, sink_keys, sink_values, tail_keys, tail_values, keys, values, centroids, \
               value_sums, key_vars, sizes, starts, n_ret, n_est, scale, out_acc, stats,      \
               k_ret, error_bound, max_ret, variance_cap, bound_margin, vc_su, vc_w,     \
               error_rank)
  switch (ck.kv_dtype) {
    case at::kFloat: RETRO_LAUNCH(float, float); break;
    case at::kBFloat16: RETRO_LAUNCH(c10::BFloat16, float); break;
    case at::kHalf: RETRO_LAUNCH(c10::Half, float); break;
    case at::kDouble: RETRO_LAUNCH(double, double); break;
    default: TORCH_CHECK(false, kOp, "unsupported KV dtype ", ck.kv_dtype);
  }
#undef RETRO_LAUNCH
  if (!direct) out.copy_(out_acc);
  return stats;
}

at::Tensor retro_decode_attention_meta(
    const at::Tensor& query, const at::Tensor& sink_keys, const at::Tensor& sink_values,
    const at::Tensor& tail_keys, const at::Tensor& tail_values, const at::Tensor& keys,
    const at::Tensor& values, const at::Tensor& centroids, const at::Tensor& value_sums,
    const at::Tensor& key_vars, const at::Tensor& sizes, const at::Tensor& starts,
    int64_t n_ret, int64_t n_est,
    double scale, at::Tensor& out, const std::optional<at::Tensor>& k_ret,
    double error_bound, int64_t max_ret, double variance_cap, double bound_margin,
    const std::optional<at::Tensor>& vc_su, const std::optional<at::Tensor>& vc_w,
    bool error_rank) {
  (void)variance_cap; (void)bound_margin; (void)vc_su; (void)vc_w; (void)error_rank;
  (void)query; (void)sink_keys; (void)sink_values; (void)tail_keys; (void)tail_values;
  (void)values; (void)centroids; (void)value_sums; (void)key_vars; (void)sizes; (void)starts;
  (void)n_ret;
  (void)n_est; (void)scale; (void)out; (void)k_ret; (void)error_bound; (void)max_ret;
  TORCH_CHECK(keys.dim() == 3, kOp, "keys must be [num_kv_heads, tokens, head_dim]");
  return at::empty({keys.size(0), 3}, keys.options().dtype(at::kLong));
}

}  // namespace vllm_retro
