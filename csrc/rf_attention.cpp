// Fused random-feature attention on the CPU: the forward of spectraformer_fused.reference_attention.
//
// One task per (sequence, key/value head), distributed with at::parallel_for; with grouped-query attention
// a task also computes the G query heads that read its key/value head. A sequence is a batch row of
// [B, T, ...] inputs, or, with cu_seqlens (packed variable-length sequences), the rows cu[n] .. cu[n+1] of
// [1, Ttot, ...] inputs; either way sequence n reads row n of the parameters and of the initial state and
// writes row n of the final state. Each task walks the sequence in chunks
// of CHUNK tokens; the features of a chunk live in per-thread buffers (never a [T, F] tensor), the state
// S [F, Dv], z [F] and its log-scale are carried across chunks exactly as the reference does:
//   * query rows subtract the maximum of their own feature exponents;
//   * keys subtract one shared running maximum; the state is rescaled by exp(m_old - m_new) when it grows;
//   * a masked key gets exponent -inf (contributes nothing, does not move the maximum);
//   * the denominator is floored: max(|den|, den_eps), den_eps = contract.DEN_EPS handed over by the caller.
// Non-causal attention first folds every key into the state (the running maximum ends at the global one,
// so the final state equals the reference's), then reads it with every query.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "rf_backward.h"
#include "rf_kernels.h"

namespace {

using namespace rf;

constexpr int64_t CHUNK = 64;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Per-(sequence, head) view of the resolved feature-map parameters.
struct HeadParams {
  const float* WT;    // [D, m]: W transposed, rows contiguous over the m frequencies
  const float* bias;  // [m]
  float freq;
  const float* psi;   // [D] or nullptr
};

struct Config {
  int kind;
  float c_t, c_o, root;
  int64_t D, Dv, m, F;
  float den_eps;      // floor of |den|: contract.DEN_EPS, handed over by the caller
  // NORM_HYP: subtract the per-row log-sum-exp from query rows too (it cancels for queries unless another
  // term, the exact part of a hybrid window, shares their normaliser); keys always subtract theirs.
  bool norm_queries = false;
};

// Per-thread scratch, sized for one chunk of a sequence of at most T tokens.
struct Workspace {
  std::vector<float> x, r, u, pq, pk, pkt, mult, sc, num, vb, den, qs;
  Workspace(const Config& c, int64_t T) {
    const int64_t rows = std::min(CHUNK, T);
    x.resize(rows * c.D);
    r.resize(rows);
    u.resize(rows * c.m);
    pq.resize(rows * c.F);
    pk.resize(rows * c.F);
    pkt.resize(c.F * rows);
    mult.resize(c.kind == KIND_TRIG ? rows * c.F : 0);
    sc.resize(rows * rows);
    num.resize(rows * c.Dv);
    vb.resize(rows * c.Dv);
    den.resize(rows);
    qs.resize(rows);
  }
};

// Loads n rows of q or k ([.., D] with row stride `stride`) scaled by sqrt(scale), applies psi (times for
// queries, divided for keys) and computes r = c_t |x'|^2 + c_o |x|^2.
template <typename scalar_t>
void load_rows(const scalar_t* src, int64_t stride, int64_t n, const Config& c, const HeadParams& hp,
               bool query, float* x, float* r) {
  const int64_t D = c.D;
  for (int64_t t = 0; t < n; ++t) {
    const scalar_t* row = src + t * stride;
    float* xr = x + t * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) xr[d] = static_cast<float>(row[d]) * c.root;
    const float sq_o = c.c_o != 0.f || !hp.psi ? dot(xr, xr, D) : 0.f;
    if (hp.psi) {
      if (query) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) xr[d] *= hp.psi[d];
      } else {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) xr[d] /= hp.psi[d];
      }
    }
    const float sq_t = hp.psi ? dot(xr, xr, D) : sq_o;
    r[t] = c.c_t * sq_t + (c.c_o != 0.f ? c.c_o * sq_o : 0.f);
  }
}

// u [n, m] = x [n, D] @ W^T, a GEMM against the transposed copy of W.
void project(const float* x, int64_t n, const Config& c, const HeadParams& hp, float* u) {
  gemm(n, c.m, c.D, x, c.D, hp.WT, c.m, u, c.m, false);  // [n, D] @ [D, m] -> [n, m]
}

// Feature exponents e [n, F] (and the cos/sin factors for TRIG) from the projections u [n, m]. NORM_HYP
// (hedgehog): the HYP exponents minus each row's log-sum-exp when `normalise` (keys; queries only when
// Config::norm_queries, as the query-row shift cancels it otherwise).
void logits(const float* u, const float* r, int64_t n, const Config& c, const HeadParams& hp, float* e,
            float* mult, bool normalise) {
  feature_exponents(c.kind, u, r, n, c.m, hp.freq, hp.bias, e, mult, normalise);
}

// phi = exp(e - shift) (* mult), in place over one row of F features.
inline void exponentiate(float* e, const float* mult, int64_t F, float shift) {
  exp_shifted(e, F, shift);
  if (mult) {
#pragma omp simd
    for (int64_t i = 0; i < F; ++i) e[i] *= mult[i];
  }
}

// Query features of n rows into pq [n, F]: each row subtracts its own maximum exponent.
template <typename scalar_t>
void query_features(const scalar_t* src, int64_t stride, int64_t n, const Config& c, const HeadParams& hp,
                    Workspace& w) {
  load_rows(src, stride, n, c, hp, true, w.x.data(), w.r.data());
  project(w.x.data(), n, c, hp, w.u.data());
  float* mult = c.kind == KIND_TRIG ? w.mult.data() : nullptr;
  logits(w.u.data(), w.r.data(), n, c, hp, w.pq.data(), mult, c.norm_queries);
  for (int64_t t = 0; t < n; ++t) {
    float* er = w.pq.data() + t * c.F;
    w.qs[t] = row_max(er, c.F);  // the row's shift, kept for a hybrid window's log-space combination
    exponentiate(er, mult ? mult + t * c.F : nullptr, c.F, w.qs[t]);
  }
}

// Key feature exponents of n rows into pk [n, F] (masked rows: -inf); returns their maximum.
template <typename scalar_t>
float key_logits(const scalar_t* src, int64_t stride, const bool* keep, int64_t n, const Config& c,
                 const HeadParams& hp, Workspace& w) {
  const int64_t F = c.F;
  load_rows(src, stride, n, c, hp, false, w.x.data(), w.r.data());
  project(w.x.data(), n, c, hp, w.u.data());
  float* mult = c.kind == KIND_TRIG ? w.mult.data() : nullptr;
  logits(w.u.data(), w.r.data(), n, c, hp, w.pk.data(), mult, true);
  float cmax = NEG_INF;
  for (int64_t t = 0; t < n; ++t) {
    float* er = w.pk.data() + t * F;
    if (keep && !keep[t]) {
      std::fill(er, er + F, NEG_INF);
    } else {
      cmax = std::max(cmax, row_max(er, F));
    }
  }
  return cmax;
}

// The key features pk [n, F] = exp(pk - shift) (* mult) and their transpose pkt [F, n].
inline void key_exponentiate(int64_t n, const Config& c, Workspace& w, float shift) {
  const int64_t F = c.F;
  float* mult = c.kind == KIND_TRIG ? w.mult.data() : nullptr;
  for (int64_t t = 0; t < n; ++t) {
    float* er = w.pk.data() + t * F;
    exponentiate(er, mult ? mult + t * F : nullptr, F, shift);
    for (int64_t f = 0; f < F; ++f) w.pkt[f * n + t] = er[f];
  }
}

// Key features of n rows into pk [n, F] and pkt [F, n]: masked rows get exponent -inf, the state moves
// to the new running maximum (S, z rescaled) and every key subtracts it.
template <typename scalar_t>
void key_features(const scalar_t* src, int64_t stride, const bool* keep, int64_t n, const Config& c,
                  const HeadParams& hp, Workspace& w, float* S, float* z, float& m_state) {
  const float cmax = key_logits(src, stride, keep, n, c, hp, w);
  const float m_new = std::max(m_state, cmax);
  const float shift = std::isinf(m_new) ? 0.f : m_new;
  if (m_new != m_state) {
    const float alpha = std::isinf(m_state) ? 0.f : std::exp(m_state - shift);
    scale_inplace(S, c.F * c.Dv, alpha);
    scale_inplace(z, c.F, alpha);
    m_state = m_new;
  }
  key_exponentiate(n, c, w, shift);
}

template <typename vscalar_t>
void load_values(const vscalar_t* src, int64_t stride, int64_t n, int64_t Dv, float* vb) {
  for (int64_t t = 0; t < n; ++t) {
    const vscalar_t* row = src + t * stride;
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) vb[t * Dv + d] = static_cast<float>(row[d]);
  }
}

// S += pk^T v, z += sum_t pk.
void update_state(int64_t n, const Config& c, Workspace& w, float* S, float* z) {
  gemm(c.F, c.Dv, n, w.pkt.data(), n, w.vb.data(), c.Dv, S, c.Dv, true);  // [F, n] @ [n, Dv] -> [F, Dv]
  for (int64_t t = 0; t < n; ++t) {
    const float* pr = w.pk.data() + t * c.F;
#pragma omp simd
    for (int64_t f = 0; f < c.F; ++f) z[f] += pr[f];
  }
}

// o_t = num_t / max(|den_t|, eps), stored in the output dtype.
template <typename oscalar_t>
void store_output(int64_t n, int64_t Dv, const float* num, const float* den, float eps, oscalar_t* dst,
                  int64_t stride) {
  for (int64_t t = 0; t < n; ++t) {
    const float inv = 1.f / std::max(std::fabs(den[t]), eps);
    oscalar_t* row = dst + t * stride;
    for (int64_t d = 0; d < Dv; ++d) row[d] = static_cast<oscalar_t>(num[t * Dv + d] * inv);
  }
}

// Reads the state with n query features: num = pq @ S (+= when accumulate), den (+)= pq . z.
void read_state(int64_t n, const Config& c, Workspace& w, const float* S, const float* z, bool accumulate) {
  gemm(n, c.Dv, c.F, w.pq.data(), c.F, S, c.Dv, w.num.data(), c.Dv, accumulate);  // [n, F] @ [F, Dv]
  for (int64_t t = 0; t < n; ++t) {
    const float d = dot(w.pq.data() + t * c.F, z, c.F);
    w.den[t] = accumulate ? w.den[t] + d : d;
  }
}

// One sequence: batch row `b`, tokens start .. start + T (all of them without cu_seqlens).
struct Span {
  int64_t b, start, T;
};

// One key/value head and the G query heads of its group (grouped-query attention: query head h reads
// key/value head h / G) over one sequence. The key features, the values and the state are computed once
// per chunk and read by every query head of the group; k and v are never repeated. `keep`: the padding
// mask of the sequence's tokens, or nullptr.
template <typename scalar_t, typename vscalar_t>
void attention_group(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& o,
                     const bool* keep, const Span& span, int64_t hk, int64_t G, const Config& c,
                     const HeadParams& hp, Workspace& w, float* S, float* z, float& m_state, bool causal) {
  const int64_t T = span.T, b = span.b, t0 = span.start;
  const scalar_t* kp = k.data_ptr<scalar_t>() + b * k.stride(0) + t0 * k.stride(1) + hk * k.stride(2);
  const vscalar_t* vp = v.data_ptr<vscalar_t>() + b * v.stride(0) + t0 * v.stride(1) + hk * v.stride(2);
  // query head g of the group: qp + g * q.stride(2), op + g * o.stride(2)
  const scalar_t* qp = q.data_ptr<scalar_t>() + b * q.stride(0) + t0 * q.stride(1) + hk * G * q.stride(2);
  vscalar_t* op = o.data_ptr<vscalar_t>() + b * o.stride(0) + t0 * o.stride(1) + hk * G * o.stride(2);
  const int64_t sq = q.stride(1), sk = k.stride(1), sv = v.stride(1), so = o.stride(1);
  const int64_t sqh = q.stride(2), soh = o.stride(2);
  const int64_t Dv = c.Dv;
  if (!causal || T == 1) {  // one token: keys first, then the query, is the causal result too
    for (int64_t lo = 0; lo < T; lo += CHUNK) {
      const int64_t n = std::min(CHUNK, T - lo);
      key_features(kp + lo * sk, sk, keep ? keep + lo : nullptr, n, c, hp, w, S, z, m_state);
      load_values(vp + lo * sv, sv, n, Dv, w.vb.data());
      update_state(n, c, w, S, z);
    }
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t lo = 0; lo < T; lo += CHUNK) {
        const int64_t n = std::min(CHUNK, T - lo);
        query_features(qp + g * sqh + lo * sq, sq, n, c, hp, w);
        read_state(n, c, w, S, z, false);
        store_output(n, Dv, w.num.data(), w.den.data(), c.den_eps, op + g * soh + lo * so, so);
      }
    }
    return;
  }
  for (int64_t lo = 0; lo < T; lo += CHUNK) {
    const int64_t n = std::min(CHUNK, T - lo);
    key_features(kp + lo * sk, sk, keep ? keep + lo : nullptr, n, c, hp, w, S, z, m_state);
    load_values(vp + lo * sv, sv, n, Dv, w.vb.data());
    for (int64_t g = 0; g < G; ++g) {
      query_features(qp + g * sqh + lo * sq, sq, n, c, hp, w);
      float* sc = w.sc.data();
      // Intra-chunk scores, key j <= query t: [n, F] @ [F, n] -> [n, n], upper triangle zeroed.
      gemm(n, n, c.F, w.pq.data(), c.F, w.pkt.data(), n, sc, n, false, TRI_N);
      for (int64_t t = 0; t < n; ++t) {
        float* row = sc + t * n;
        std::fill(row + t + 1, row + n, 0.f);
        float s = 0.f;
        for (int64_t j = 0; j <= t; ++j) s += row[j];
        w.den[t] = s;
      }
      gemm_lower(n, Dv, sc, n, w.vb.data(), Dv, w.num.data(), Dv);  // [n, n] @ [n, Dv] -> [n, Dv]
      read_state(n, c, w, S, z, true);
      store_output(n, Dv, w.num.data(), w.den.data(), c.den_eps, op + g * soh + lo * so, so);
    }
    update_state(n, c, w, S, z);
  }
}

#define RF_DISPATCH(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                         \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// Work per (sequence, head) below which a single thread runs several of them (decode steps).
constexpr int64_t GRAIN_WORK = 1 << 16;

// Runs task(i, w) for i in 0 .. n, each on some thread with that thread's workspace w. `lengths[i]`: the
// tokens of task i, which sizes the workspaces and, with `balance`, the schedule: the tasks are taken
// longest first from a shared counter (packed sequences of different lengths), instead of the contiguous
// equal blocks of at::parallel_for (equal tasks, as in a batch). Every task writes only its own rows, so
// the result does not depend on the schedule or the thread count.
template <typename Task>
void run_tasks(int64_t n, const std::vector<int64_t>& lengths, int64_t work_per_token, bool balance,
               const Config& c, const Task& task) {
  if (n == 0) return;
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  if (!balance) {  // equal tasks: contiguous blocks, several per thread when they are small
    const int64_t grain = std::max<int64_t>(1, GRAIN_WORK / std::max<int64_t>(1, longest * work_per_token));
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      Workspace w(c, longest);
      for (int64_t i = begin; i < end; ++i) task(i, w);
    });
    return;
  }
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  int64_t tokens = 0;
  for (int64_t len : lengths) tokens += len;
  const int64_t workers = std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), n,
                            tokens * work_per_token / GRAIN_WORK}));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // Inline (a single worker, or inside a parallel region) this one call takes every task.
    Workspace w(c, longest);
    for (int64_t j = next++; j < n; j = next++) task(order[j], w);
  });
}

std::vector<at::Tensor> rf_attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                             const at::Tensor& v_in, const at::Tensor& W_in,
                                             const at::Tensor& bias_in, const at::Tensor& freq_in,
                                             const c10::optional<at::Tensor>& psi_in, int64_t kind, double c_t,
                                             double c_o, double scale, bool causal,
                                             const c10::optional<at::Tensor>& mask_in,
                                             const c10::optional<at::Tensor>& S_in,
                                             const c10::optional<at::Tensor>& z_in,
                                             const c10::optional<at::Tensor>& m_in, double den_eps,
                                             const c10::optional<at::Tensor>& WT_in,
                                             const c10::optional<at::Tensor>& cu_in) {
  auto given = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  TORCH_CHECK_VALUE(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "q, k, v must be [B, T, H, D]");
  TORCH_CHECK_VALUE(q_in.device().is_cpu(), "the cpu backend needs CPU tensors");
  TORCH_CHECK_TYPE(q_in.scalar_type() == k_in.scalar_type(), "q and k must have the same dtype");
  TORCH_CHECK_VALUE(kind == KIND_EXP || kind == KIND_HYP || kind == KIND_TRIG || kind == KIND_NORM_HYP,
                    "unknown feature kind ", kind);
  TORCH_CHECK_VALUE(given(S_in) == given(z_in) && given(S_in) == given(m_in),
                    "the initial state S, z and log_scale must be given together (or none of them); got S: ",
                    given(S_in), ", z: ", given(z_in), ", log_scale: ", given(m_in));
  const auto fdt = at::kFloat;
  // fp32, bf16 and fp16 are read natively; anything else (fp64) goes through fp32.
  auto native = [&](const at::Tensor& t) {
    const auto st = t.scalar_type();
    const at::Tensor u = (st == at::kFloat || st == at::kBFloat16 || st == at::kHalf) ? t : t.to(fdt);
    return u.stride(-1) == 1 ? u : u.contiguous();
  };
  at::Tensor q = native(q_in), k = native(k_in), v = native(v_in);
  // H query heads, H (=Hk) / G key/value heads: the parameters and the state are per key/value head.
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3), Dv = v.size(3);
  const int64_t H = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && v.size(0) == B && k.size(1) == T && v.size(1) == T && k.size(3) == D,
                    "q, k, v must be [B, T, H, D], [B, T, H_kv, D], [B, T, H_kv, Dv]");
  TORCH_CHECK_VALUE(v.size(2) == H && H > 0 && Hq % H == 0,
                    "k and v must have H_kv heads, H_kv dividing q's heads");
  const int64_t G = Hq / H;
  const int64_t m = W_in.size(1);
  TORCH_CHECK_VALUE(W_in.dim() == 3 && W_in.size(0) == H && W_in.size(2) == D, "W must be [H_kv, m, D]");
  const int64_t F = kind == KIND_EXP ? m : 2 * m;

  // The sequences: one per batch row, or the packed ones of cu_seqlens (B = 1, no padding mask).
  std::vector<Span> spans;
  const bool varlen = given(cu_in);
  if (varlen) {
    const at::Tensor cu = cu_in->to(at::kLong).contiguous();
    TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 2, "cu_seqlens must be [N + 1] with N >= 1");
    TORCH_CHECK_VALUE(B == 1, "cu_seqlens needs packed inputs [1, Ttot, H, D], got batch ", B);
    TORCH_CHECK_VALUE(!given(mask_in), "cu_seqlens and a key padding mask cannot be combined");
    const int64_t* cp = cu.data_ptr<int64_t>();
    const int64_t N = cu.size(0) - 1;
    TORCH_CHECK_VALUE(cp[0] == 0 && cp[N] == T, "cu_seqlens must start at 0 and end at the packed length ", T,
                      ", got ", cp[0], " and ", cp[N]);
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK_VALUE(cp[n + 1] >= cp[n], "cu_seqlens must be non-decreasing, got ", cp[n], " then ", cp[n + 1]);
      spans.push_back({0, cp[n], cp[n + 1] - cp[n]});
    }
  } else {
    for (int64_t b = 0; b < B; ++b) spans.push_back({b, 0, T});
  }
  const int64_t R = static_cast<int64_t>(spans.size());  // rows of the parameters and of the state

  at::Tensor WT;  // [H, D, m]: given by the caller (who may keep it across calls), or made here
  if (given(WT_in)) {
    TORCH_CHECK_VALUE(WT_in->scalar_type() == fdt && WT_in->is_contiguous() && WT_in->dim() == 3 &&
                          WT_in->size(0) == H && WT_in->size(1) == D && WT_in->size(2) == m,
                      "WT must be a contiguous fp32 [H_kv, D, m] tensor");
    WT = *WT_in;
  } else {
    WT = W_in.to(fdt).transpose(1, 2).contiguous();
  }
  // Per-sequence parameters [R, H, ...] (a leading 1 broadcasts over the sequences).
  auto rows = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name) {
    TORCH_CHECK_VALUE(t.dim() == static_cast<int64_t>(shape.size()) && (t.size(0) == 1 || t.size(0) == R) &&
                          t.sizes().slice(1) == shape.slice(1),
                      name, " must be ", shape, " (or with 1 row), got ", t.sizes());
    return t.to(fdt).expand(shape).contiguous();
  };
  at::Tensor bias = rows(bias_in, {R, H, m}, "bias");
  at::Tensor freq = rows(freq_in, {R, H}, "freq");
  at::Tensor psi;
  if (given(psi_in)) psi = rows(*psi_in, {R, H, D}, "psi");
  at::Tensor mask;
  if (given(mask_in)) {
    mask = mask_in->to(at::kBool).contiguous();
    TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == T, "mask must be [B, T]");
  }

  // The final state is written to new tensors; each task copies its head of the initial state there.
  at::Tensor S0, z0, m0;
  if (given(S_in)) {
    S0 = S_in->to(fdt).contiguous();
    z0 = z_in->to(fdt).contiguous();
    m0 = m_in->to(fdt).contiguous();
    TORCH_CHECK_VALUE(S0.sizes() == at::IntArrayRef({R, H, F, Dv}) && z0.sizes() == at::IntArrayRef({R, H, F}) &&
                          m0.sizes() == at::IntArrayRef({R, H}),
                      "the initial state must be S [", R, ", ", H, ", ", F, ", ", Dv, "], z [", R, ", ", H, ", ", F,
                      "], log_scale [", R, ", ", H, "]; got ", S0.sizes(), ", ", z0.sizes(), ", ", m0.sizes());
  }
  at::Tensor S = at::empty({R, H, F, Dv}, q.options().dtype(fdt));
  at::Tensor z = at::empty({R, H, F}, q.options().dtype(fdt));
  at::Tensor mstate = at::empty({R, H}, q.options().dtype(fdt));
  at::Tensor o = at::empty({B, T, Hq, Dv}, v.options());

  Config c{static_cast<int>(kind), static_cast<float>(c_t), static_cast<float>(c_o),
           static_cast<float>(std::sqrt(scale)), D, Dv, m, F, static_cast<float>(den_eps)};
  const float* WTp = WT.data_ptr<float>();
  const float* S0p = S0.defined() ? S0.data_ptr<float>() : nullptr;
  const float* z0p = S0.defined() ? z0.data_ptr<float>() : nullptr;
  const float* m0p = S0.defined() ? m0.data_ptr<float>() : nullptr;
  const float* biasp = bias.data_ptr<float>();
  const float* freqp = freq.data_ptr<float>();
  const float* psip = psi.defined() ? psi.data_ptr<float>() : nullptr;
  const bool* maskp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  float* Sp = S.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  float* mp = mstate.data_ptr<float>();

  // Task i: sequence i / H, key/value head i % H; row i of the [R * H, ...] parameters and states.
  std::vector<int64_t> lengths(R * H);
  for (int64_t i = 0; i < R * H; ++i) lengths[i] = spans[i / H].T;
  const int64_t work_per_token = F * (D + Dv) * (G + 1);
  RF_DISPATCH(q.scalar_type(), "rf_attention_cpu_qk", [&] {
    using qk_t = scalar_t;
    RF_DISPATCH(v.scalar_type(), "rf_attention_cpu_v", [&] {
      using v_t = scalar_t;
      run_tasks(R * H, lengths, work_per_token, varlen, c, [&](int64_t i, Workspace& w) {
        const Span& span = spans[i / H];
        const int64_t h = i % H;
        HeadParams hp{WTp + h * D * m, biasp + i * m, freqp[i], psip ? psip + i * D : nullptr};
        if (S0p) {
          std::memcpy(Sp + i * F * Dv, S0p + i * F * Dv, sizeof(float) * F * Dv);
          std::memcpy(zp + i * F, z0p + i * F, sizeof(float) * F);
          mp[i] = m0p[i];
        } else {
          std::fill(Sp + i * F * Dv, Sp + (i + 1) * F * Dv, 0.f);
          std::fill(zp + i * F, zp + (i + 1) * F, 0.f);
          mp[i] = NEG_INF;
        }
        const bool* keep = maskp ? maskp + span.b * T + span.start : nullptr;
        attention_group<qk_t, v_t>(q, k, v, o, keep, span, h, G, c, hp, w, Sp + i * F * Dv, zp + i * F, mp[i],
                                   causal);
      });
    });
  });
  if (o.scalar_type() != v_in.scalar_type()) o = o.to(v_in.scalar_type());
  return {o, S, z, mstate};
}

}  // namespace

#include "rf_window.cpp"
#include "rf_cache.cpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Fused random-feature attention on the CPU (forward; see spectraformer_fused/ops/cpu.py)";
  module.def("forward", &rf_attention_forward,
             "forward(q, k, v, W, bias, freq, psi, kind, c_t, c_o, scale, causal, mask, S, z, log_scale, den_eps, "
             "WT=None, "
             "cu_seqlens=None) -> [o, S, z, log_scale]; WT: W transposed to a contiguous fp32 [H, D, m] (made "
             "when omitted); cu_seqlens: [N + 1] offsets of packed sequences in [1, Ttot, ...] inputs, the "
             "parameters and states then having N rows",
             py::arg("q"), py::arg("k"), py::arg("v"), py::arg("W"), py::arg("bias"), py::arg("freq"),
             py::arg("psi"), py::arg("kind"), py::arg("c_t"), py::arg("c_o"), py::arg("scale"),
             py::arg("causal"), py::arg("mask"), py::arg("S"), py::arg("z"), py::arg("log_scale"),
             py::arg("den_eps"), py::arg("WT") = py::none(), py::arg("cu_seqlens") = py::none());
  module.def("backward", &rf_attention_backward,
             "backward(do, dS, dz, q, k, v, W, bias, freq, psi, kind, c_t, c_o, scale, causal, mask, S0, z0, "
             "log_scale0, S, z, log_scale, den_eps, cu_seqlens) -> [dq, dk, dv, dW, dbias, dS0, dz0] (fp32); "
             "S, z, log_scale: the forward's final state (needed when non-causal); dS0, dz0 undefined without "
             "an initial state; dbias [R, H_kv, m] per batch row or sequence (see csrc/rf_backward.cpp)",
             py::arg("do"), py::arg("dS"), py::arg("dz"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("W"),
             py::arg("bias"), py::arg("freq"), py::arg("psi"), py::arg("kind"), py::arg("c_t"), py::arg("c_o"),
             py::arg("scale"), py::arg("causal"), py::arg("mask"), py::arg("S0"), py::arg("z0"),
             py::arg("log_scale0"), py::arg("S"), py::arg("z"), py::arg("log_scale"), py::arg("den_eps"),
             py::arg("cu_seqlens") = py::none());
  module.def("window_forward", &rf_window_forward,
             "window_forward(q, k, v, WT, bias, freq, psi, kind, c_t, c_o, scale, exact_sq, causal, window, mask, "
             "S, z, log_scale, k_tail, v_tail, tail_keep, den_eps, cu_seqlens, sink_k, sink_v, sink_from, "
             "sink_skip, log_mix, need_stats) -> [o, S, z, log_scale, k_tail, v_tail, tail_keep, stats, key_shift]: hybrid "
             "attention (exact "
             "inside the window and on the sinks, features beyond; see rf_window.cpp), the arguments prepared by "
             "ops/cpu_window.py",
             py::arg("q"), py::arg("k"), py::arg("v"), py::arg("WT"), py::arg("bias"), py::arg("freq"),
             py::arg("psi"), py::arg("kind"), py::arg("c_t"), py::arg("c_o"), py::arg("scale"), py::arg("exact_sq"),
             py::arg("causal"), py::arg("window"), py::arg("mask"), py::arg("S"), py::arg("z"), py::arg("log_scale"),
             py::arg("k_tail"), py::arg("v_tail"), py::arg("tail_keep"), py::arg("den_eps"),
             py::arg("cu_seqlens") = py::none(), py::arg("sink_k") = py::none(), py::arg("sink_v") = py::none(),
             py::arg("sink_from") = py::none(), py::arg("sink_skip") = py::none(), py::arg("log_mix") = py::none(),
             py::arg("need_stats") = false);
  module.def("cache_fold", &rf_cache_fold,
             "cache_fold(S, z, log_scale, e, mult, ck, cv, loser) -> [S, z, log_scale, k_cache, v_cache]: the "
             "exact cache's fold of the key ``loser`` of the N = C + 1 that competed (rf_cache.cpp)",
             py::arg("S"), py::arg("z"), py::arg("log_scale"), py::arg("e"), py::arg("mult"), py::arg("ck"),
             py::arg("cv"), py::arg("loser"));
  module.def("window_backward", &rf_window_backward,
             "window_backward(do, dS, dz, dk_tail, dv_tail, q, k, v, W, bias, freq, psi, kind, c_t, c_o, scale, "
             "exact_sq, causal, window, mask, S, z, log_scale, k_tail, v_tail, tail_keep, den_eps, cu_seqlens, "
             "sink_k, sink_v, sink_from, sink_skip, log_mix) -> [dq, dk, dv, dW, dbias, dS0, dz0, dk_tail0, "
             "dv_tail0, dk_sink, dv_sink, dlog_mix] (fp32): the fused hybrid backward (rf_window_bwd.cpp; non-causal "
             "needs the forward's o, stats and key_shift)",
             py::arg("do"), py::arg("dS"), py::arg("dz"), py::arg("dk_tail"), py::arg("dv_tail"), py::arg("q"),
             py::arg("k"), py::arg("v"), py::arg("W"), py::arg("bias"), py::arg("freq"), py::arg("psi"),
             py::arg("kind"), py::arg("c_t"), py::arg("c_o"), py::arg("scale"), py::arg("exact_sq"),
             py::arg("causal"), py::arg("window"), py::arg("mask"), py::arg("S"), py::arg("z"), py::arg("log_scale"),
             py::arg("k_tail"), py::arg("v_tail"), py::arg("tail_keep"), py::arg("den_eps"), py::arg("cu_seqlens"),
             py::arg("sink_k"), py::arg("sink_v"), py::arg("sink_from"), py::arg("sink_skip"), py::arg("log_mix"),
             py::arg("o") = py::none(), py::arg("stats") = py::none(), py::arg("key_shift") = py::none());
}
