// Fused random-feature attention on the CPU: the forward of spectraformer_fused.reference_attention.
//
// One task per (batch, key/value head), distributed with at::parallel_for; with grouped-query attention a
// task also computes the G query heads that read its key/value head. Each task walks the sequence in chunks
// of CHUNK tokens; the features of a chunk live in per-thread buffers (never a [T, F] tensor), the state
// S [F, Dv], z [F] and its log-scale are carried across chunks exactly as the reference does:
//   * query rows subtract the maximum of their own feature exponents;
//   * keys subtract one shared running maximum; the state is rescaled by exp(m_old - m_new) when it grows;
//   * a masked key gets exponent -inf (contributes nothing, does not move the maximum);
//   * the denominator is floored: max(|den|, 1e-30).
// Non-causal attention first folds every key into the state (the running maximum ends at the global one,
// so the final state equals the reference's), then reads it with every query.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "rf_kernels.h"

namespace {

using namespace rf;

constexpr int64_t CHUNK = 64;
constexpr float DEN_EPS = 1e-30f;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Per-(batch, head) view of the resolved feature-map parameters.
struct HeadParams {
  const float* W;     // [m, D], rows `ldw` apart (used for short inputs: decode steps)
  int64_t ldw;
  const float* WT;    // [D, m]: W transposed, rows contiguous over the m frequencies; or nullptr
  const float* bias;  // [m]
  float freq;
  const float* psi;   // [D] or nullptr
};

struct Config {
  int kind;
  float c_t, c_o, root;
  int64_t D, Dv, m, F;
};

// Per-thread scratch, sized for one chunk.
struct Workspace {
  std::vector<float> x, r, u, pq, pk, pkt, mult, sc, num, vb, den;
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

// u [n, m] = x [n, D] @ W^T: a GEMM against the transposed copy, or m dot products per row when no
// copy was made (a few rows: the copy would cost more than it saves).
void project(const float* x, int64_t n, const Config& c, const HeadParams& hp, float* u) {
  if (hp.WT) {
    gemm(n, c.m, c.D, x, c.D, hp.WT, c.m, u, c.m, false);  // [n, D] @ [D, m] -> [n, m]
    return;
  }
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < c.m; ++i) u[t * c.m + i] = dot(x + t * c.D, hp.W + i * hp.ldw, c.D);
}

// Feature exponents e [n, F] (and the cos/sin factors for TRIG) from the projections u [n, m].
void logits(const float* u, const float* r, int64_t n, const Config& c, const HeadParams& hp, float* e,
            float* mult) {
  const int64_t m = c.m, F = c.F;
  const float f = hp.freq;
  const float* b = hp.bias;
  for (int64_t t = 0; t < n; ++t) {
    const float* ur = u + t * m;
    float* er = e + t * F;
    const float rt = r[t];
    if (c.kind == KIND_EXP) {
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) er[i] = b[i] + f * ur[i] + rt;
    } else if (c.kind == KIND_HYP) {
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) {
        er[i] = b[i] + f * ur[i] + rt;
        er[m + i] = b[i] - f * ur[i] + rt;
      }
    } else {
      float* mr = mult + t * F;
      for (int64_t i = 0; i < m; ++i) {
        er[i] = er[m + i] = b[i] + rt;
        const float a = f * ur[i];
        mr[i] = std::cos(a);
        mr[m + i] = std::sin(a);
      }
    }
  }
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
  logits(w.u.data(), w.r.data(), n, c, hp, w.pq.data(), mult);
  for (int64_t t = 0; t < n; ++t) {
    float* er = w.pq.data() + t * c.F;
    exponentiate(er, mult ? mult + t * c.F : nullptr, c.F, row_max(er, c.F));
  }
}

// Key features of n rows into pk [n, F] and pkt [F, n]: masked rows get exponent -inf, the state moves
// to the new running maximum (S, z rescaled) and every key subtracts it.
template <typename scalar_t>
void key_features(const scalar_t* src, int64_t stride, const bool* keep, int64_t n, const Config& c,
                  const HeadParams& hp, Workspace& w, float* S, float* z, float& m_state) {
  const int64_t F = c.F;
  load_rows(src, stride, n, c, hp, false, w.x.data(), w.r.data());
  project(w.x.data(), n, c, hp, w.u.data());
  float* mult = c.kind == KIND_TRIG ? w.mult.data() : nullptr;
  logits(w.u.data(), w.r.data(), n, c, hp, w.pk.data(), mult);
  float cmax = NEG_INF;
  for (int64_t t = 0; t < n; ++t) {
    float* er = w.pk.data() + t * F;
    if (keep && !keep[t]) {
      std::fill(er, er + F, NEG_INF);
    } else {
      cmax = std::max(cmax, row_max(er, F));
    }
  }
  const float m_new = std::max(m_state, cmax);
  const float shift = std::isinf(m_new) ? 0.f : m_new;
  if (m_new != m_state) {
    const float alpha = std::isinf(m_state) ? 0.f : std::exp(m_state - shift);
    scale_inplace(S, F * c.Dv, alpha);
    scale_inplace(z, F, alpha);
    m_state = m_new;
  }
  for (int64_t t = 0; t < n; ++t) {
    float* er = w.pk.data() + t * F;
    exponentiate(er, mult ? mult + t * F : nullptr, F, shift);
    for (int64_t f = 0; f < F; ++f) w.pkt[f * n + t] = er[f];
  }
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
void store_output(int64_t n, int64_t Dv, const float* num, const float* den, oscalar_t* dst, int64_t stride) {
  for (int64_t t = 0; t < n; ++t) {
    const float inv = 1.f / std::max(std::fabs(den[t]), DEN_EPS);
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

// One key/value head and the G query heads of its group (grouped-query attention: query head h reads
// key/value head h / G). The key features, the values and the state are computed once per chunk and read
// by every query head of the group; k and v are never repeated.
template <typename scalar_t, typename vscalar_t>
void attention_group(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& o,
                     const bool* mask, int64_t b, int64_t hk, int64_t G, const Config& c, const HeadParams& hp,
                     Workspace& w, float* S, float* z, float& m_state, bool causal) {
  const int64_t T = q.size(1);
  const scalar_t* kp = k.data_ptr<scalar_t>() + b * k.stride(0) + hk * k.stride(2);
  const vscalar_t* vp = v.data_ptr<vscalar_t>() + b * v.stride(0) + hk * v.stride(2);
  // query head g of the group: qp + g * q.stride(2), op + g * o.stride(2)
  const scalar_t* qp = q.data_ptr<scalar_t>() + b * q.stride(0) + hk * G * q.stride(2);
  vscalar_t* op = o.data_ptr<vscalar_t>() + b * o.stride(0) + hk * G * o.stride(2);
  const int64_t sq = q.stride(1), sk = k.stride(1), sv = v.stride(1), so = o.stride(1);
  const int64_t sqh = q.stride(2), soh = o.stride(2);
  const bool* keep = mask ? mask + b * T : nullptr;
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
        store_output(n, Dv, w.num.data(), w.den.data(), op + g * soh + lo * so, so);
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
      store_output(n, Dv, w.num.data(), w.den.data(), op + g * soh + lo * so, so);
    }
    update_state(n, c, w, S, z);
  }
}

#define RF_DISPATCH(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                         \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// Work per (batch, head) below which a single thread runs several of them (decode steps).
constexpr int64_t GRAIN_WORK = 1 << 16;
// Sequences at least this long project through a transposed copy of W (GEMM); shorter ones use dots.
constexpr int64_t TRANSPOSE_MIN_T = 16;

std::vector<at::Tensor> rf_attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                             const at::Tensor& v_in, const at::Tensor& W_in,
                                             const at::Tensor& bias_in, const at::Tensor& freq_in,
                                             const c10::optional<at::Tensor>& psi_in, int64_t kind, double c_t,
                                             double c_o, double scale, bool causal,
                                             const c10::optional<at::Tensor>& mask_in,
                                             const c10::optional<at::Tensor>& S_in,
                                             const c10::optional<at::Tensor>& z_in,
                                             const c10::optional<at::Tensor>& m_in,
                                             const c10::optional<at::Tensor>& WT_in) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "q, k, v must be [B, T, H, D]");
  TORCH_CHECK(q_in.device().is_cpu(), "the cpu backend needs CPU tensors");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type(), "q and k must have the same dtype");
  TORCH_CHECK(kind == KIND_EXP || kind == KIND_HYP || kind == KIND_TRIG, "unknown feature kind ", kind);
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
  TORCH_CHECK(v.size(2) == H && H > 0 && Hq % H == 0, "k and v must have H_kv heads, H_kv dividing q's heads");
  const int64_t G = Hq / H;
  const int64_t m = W_in.size(1);
  TORCH_CHECK(W_in.size(0) == H && W_in.size(2) == D, "W must be [H_kv, m, D]");
  const int64_t F = kind == KIND_EXP ? m : 2 * m;
  at::Tensor Wf = W_in.to(fdt);
  if (Wf.stride(2) != 1) Wf = Wf.contiguous();
  at::Tensor WT;  // [H, D, m]: given by the caller, or made for inputs long enough to amortise the copy
  if (WT_in.has_value() && WT_in->defined()) {
    TORCH_CHECK(WT_in->scalar_type() == fdt && WT_in->is_contiguous() && WT_in->size(0) == H &&
                    WT_in->size(1) == D && WT_in->size(2) == m,
                "WT must be a contiguous fp32 [H_kv, D, m] tensor");
    WT = *WT_in;
  } else if (T >= TRANSPOSE_MIN_T) {
    WT = Wf.transpose(1, 2).contiguous();
  }
  at::Tensor bias = bias_in.to(fdt).contiguous();              // [B, H, m]
  at::Tensor freq = freq_in.to(fdt).contiguous();              // [B, H]
  at::Tensor psi;
  if (psi_in.has_value() && psi_in->defined()) psi = psi_in->to(fdt).contiguous();  // [B, H, D]
  at::Tensor mask;
  if (mask_in.has_value() && mask_in->defined()) mask = mask_in->to(at::kBool).contiguous();  // [B, T]

  // The final state is written to new tensors; each task copies its head of the initial state there.
  at::Tensor S0, z0, m0;
  if (S_in.has_value() && S_in->defined()) {
    S0 = S_in->to(fdt).contiguous();
    z0 = z_in->to(fdt).contiguous();
    m0 = m_in->to(fdt).contiguous();
  }
  at::Tensor S = at::empty({B, H, F, Dv}, q.options().dtype(fdt));
  at::Tensor z = at::empty({B, H, F}, q.options().dtype(fdt));
  at::Tensor mstate = at::empty({B, H}, q.options().dtype(fdt));
  at::Tensor o = at::empty({B, T, Hq, Dv}, v.options());

  Config c{static_cast<int>(kind), static_cast<float>(c_t), static_cast<float>(c_o),
           static_cast<float>(std::sqrt(scale)), D, Dv, m, F};
  const float* Wp = Wf.data_ptr<float>();
  const float* WTp = WT.defined() ? WT.data_ptr<float>() : nullptr;
  const int64_t w_head = Wf.stride(0), ldw = Wf.stride(1);
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

  const int64_t work = std::max<int64_t>(1, T * F * (D + Dv) * (G + 1));
  const int64_t grain = std::max<int64_t>(1, GRAIN_WORK / work);
  RF_DISPATCH(q.scalar_type(), "rf_attention_cpu_qk", [&] {
    using qk_t = scalar_t;
    RF_DISPATCH(v.scalar_type(), "rf_attention_cpu_v", [&] {
      using v_t = scalar_t;
      at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
        Workspace w(c, T);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / H, h = i % H;
          HeadParams hp{Wp + h * w_head, ldw, WTp ? WTp + h * D * m : nullptr, biasp + i * m, freqp[i],
                        psip ? psip + i * D : nullptr};
          if (S0p) {
            std::memcpy(Sp + i * F * Dv, S0p + i * F * Dv, sizeof(float) * F * Dv);
            std::memcpy(zp + i * F, z0p + i * F, sizeof(float) * F);
            mp[i] = m0p[i];
          } else {
            std::fill(Sp + i * F * Dv, Sp + (i + 1) * F * Dv, 0.f);
            std::fill(zp + i * F, zp + (i + 1) * F, 0.f);
            mp[i] = NEG_INF;
          }
          attention_group<qk_t, v_t>(q, k, v, o, maskp, b, h, G, c, hp, w, Sp + i * F * Dv, zp + i * F, mp[i],
                                     causal);
        }
      });
    });
  });
  if (o.scalar_type() != v_in.scalar_type()) o = o.to(v_in.scalar_type());
  return {o, S, z, mstate};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Fused random-feature attention on the CPU (forward; see spectraformer_fused/ops/cpu.py)";
  module.def("forward", &rf_attention_forward,
             "forward(q, k, v, W, bias, freq, psi, kind, c_t, c_o, scale, causal, mask, S, z, log_scale, WT=None) "
             "-> [o, S, z, log_scale]; WT: W transposed to a contiguous fp32 [H, D, m] (made when omitted)",
             py::arg("q"), py::arg("k"), py::arg("v"), py::arg("W"), py::arg("bias"), py::arg("freq"),
             py::arg("psi"), py::arg("kind"), py::arg("c_t"), py::arg("c_o"), py::arg("scale"),
             py::arg("causal"), py::arg("mask"), py::arg("S"), py::arg("z"), py::arg("log_scale"),
             py::arg("WT") = py::none());
}
