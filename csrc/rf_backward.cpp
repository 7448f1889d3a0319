// Fused backward of random-feature attention on the CPU (the gradients of rf_attention.cpp's forward).
//
// Nothing of size [T, F] is saved by the forward: the features are recomputed here chunk by chunk from
// the inputs, with the same stabilisers (each query row its own maximum exponent; the keys of chunk c the
// running maximum after chunk c, recomputed by a forward walk; non-causal: the final state's log-scale).
// With g_t = dL/do_t, den_s = max(|den_t|, eps), a_t = g_t / den_s and
// beta_t = -(g_t . o_t) sign(den_t) / den_s (0 where the floor is active):
//
//   dphiq_t = sum_{j <= t in chunk} phik_j (v_j . a_t + beta_t) + S_in a_t + z_in beta_t
//   dphik_j = sum_{t >= j in chunk} phiq_t (v_j . a_t + beta_t) + dS_out v_j + dz_out
//   dv_j    = sum_{t >= j in chunk} (phiq_t . phik_j) a_t + dS_out^T phik_j
//
// S_in, z_in: the state a chunk's queries read (rescaled to the chunk's key stabiliser); dS_out, dz_out:
// the gradient of the state after the chunk, carried backwards over the chunks (seeded by the final
// state's gradient) and moved to the previous chunk's stabiliser by the forward's factor
// alpha_c = exp(m_{c-1} - shift_c) (0 while the state was empty); after the first chunk it is dS0, dz0.
//
// Causal, per task: a forward walk rebuilds the state and gives dq (and stores per query row den_s and
// beta, per chunk the key shift and alpha); a backward walk carries dS, dz and gives dk, dv. Non-causal:
// the queries read the saved final state (dq and the queries' part of dS, dz), then the keys (dk, dv).
// The features' gradients go through phi = exp(e - shift) (* cos/sin): de = dphi * phi, and on to x', W,
// bias; the stabilisers, freq and psi are constants. One task per (sequence, key/value head), its query
// heads inside it; dW is written as one fp32 partial per task and summed over the sequences in a fixed
// order afterwards (no atomics, the result does not depend on the schedule).
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

constexpr int64_t BCHUNK = 64;  // the forward's chunk: the causal key stabilisers are per chunk of it
constexpr float BNEG_INF = -std::numeric_limits<float>::infinity();

struct BwdConfig {
  int kind;
  float c_t, c_o, root;
  int64_t D, Dv, m, F;
  float den_eps;
  bool norm_queries = false;  // hedgehog query rows subtract their lse too (the hybrid window)
};

struct BwdHead {
  const float* W;     // [m, D]
  const float* WT;    // [D, m]
  const float* bias;  // [m]
  float freq;
  const float* psi;   // [D] or nullptr
};

// The features of up to BCHUNK rows and what their gradient needs.
struct Rows {
  std::vector<float> x, xt, r, u, phi, mult;  // x, x' [n, D]; r [n]; u [n, m]; phi, mult (TRIG) [n, F]
  Rows(const BwdConfig& c, int64_t rows)
      : x(rows * c.D), xt(rows * c.D), r(rows), u(rows * c.m), phi(rows * c.F),
        mult(c.kind == KIND_TRIG ? rows * c.F : 0) {}
};

struct BwdWorkspace {
  Rows kr, qr;
  std::vector<float> vb, vT, A, AT, beta, num, den, sc, P, pqT, pkt, dphi, dpk, du, duT, dxt, dvb;
  std::vector<float> S, z, ST, dS, dST, dz;
  BwdWorkspace(const BwdConfig& c, int64_t T)
      : kr(c, std::min(BCHUNK, T)), qr(c, std::min(BCHUNK, T)) {
    const int64_t n = std::min(BCHUNK, T), F = c.F, Dv = c.Dv;
    for (auto* b : {&vb, &A, &num, &dvb}) b->resize(n * Dv);
    for (auto* b : {&vT, &AT}) b->resize(Dv * n);
    for (auto* b : {&beta, &den}) b->resize(n);
    for (auto* b : {&sc, &P}) b->resize(n * n);
    for (auto* b : {&pqT, &pkt, &dphi, &dpk}) b->resize(n * F);
    du.resize(n * c.m);
    duT.resize(c.m * n);
    dxt.resize(n * c.D);
    for (auto* b : {&S, &ST, &dS, &dST}) b->resize(F * Dv);
    for (auto* b : {&z, &dz}) b->resize(F);
  }
};

// dst [cols, rows] = src [rows, cols]^T
inline void transpose(const float* src, int64_t rows, int64_t cols, float* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
}

// x = row * root, x' = x * psi (queries) or x / psi (keys), r = c_t |x'|^2 + c_o |x|^2, u = x' W^T and the
// feature exponents into phi (the cos/sin factors into mult for TRIG), as the forward computes them.
void logits(const float* src, int64_t stride, int64_t n, const BwdConfig& c, const BwdHead& hp, bool query,
            Rows& f) {
  const int64_t D = c.D, m = c.m;
  for (int64_t t = 0; t < n; ++t) {
    const float* row = src + t * stride;
    float* xr = f.x.data() + t * D;
    float* xtr = f.xt.data() + t * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) xr[d] = row[d] * c.root;
    const float sq_o = c.c_o != 0.f || !hp.psi ? dot(xr, xr, D) : 0.f;
    if (hp.psi) {
      if (query) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) xtr[d] = xr[d] * hp.psi[d];
      } else {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) xtr[d] = xr[d] / hp.psi[d];
      }
    } else {
      std::memcpy(xtr, xr, sizeof(float) * D);
    }
    const float sq_t = hp.psi ? dot(xtr, xtr, D) : sq_o;
    f.r[t] = c.c_t * sq_t + (c.c_o != 0.f ? c.c_o * sq_o : 0.f);
  }
  gemm(n, m, D, f.xt.data(), D, hp.WT, m, f.u.data(), m, false);  // [n, D] @ [D, m]
  // hedgehog: a key's features are its HYP exponents minus the row's log-sum-exp, as in the forward; a
  // query's row shift cancels its own
  feature_exponents(c.kind, f.u.data(), f.r.data(), n, m, hp.freq, hp.bias, f.phi.data(),
                    c.kind == KIND_TRIG ? f.mult.data() : nullptr, !query || c.norm_queries);
}

// phi = exp(e - shift) (* mult) for row t.
inline void exponentiate_row(Rows& f, int64_t t, int64_t F, float shift) {
  float* er = f.phi.data() + t * F;
  exp_shifted(er, F, shift);
  if (!f.mult.empty()) {
    const float* mr = f.mult.data() + t * F;
#pragma omp simd
    for (int64_t i = 0; i < F; ++i) er[i] *= mr[i];
  }
}

void query_phi(const float* src, int64_t stride, int64_t n, const BwdConfig& c, const BwdHead& hp, Rows& f) {
  logits(src, stride, n, c, hp, true, f);
  for (int64_t t = 0; t < n; ++t) exponentiate_row(f, t, c.F, row_max(f.phi.data() + t * c.F, c.F));
}

// Key exponents with masked rows at -inf; returns the maximum over the kept rows.
float key_logits(const float* src, int64_t stride, const bool* keep, int64_t n, const BwdConfig& c,
                 const BwdHead& hp, Rows& f) {
  logits(src, stride, n, c, hp, false, f);
  float cmax = BNEG_INF;
  for (int64_t t = 0; t < n; ++t) {
    float* er = f.phi.data() + t * c.F;
    if (keep && !keep[t]) {
      std::fill(er, er + c.F, BNEG_INF);
    } else {
      cmax = std::max(cmax, row_max(er, c.F));
    }
  }
  return cmax;
}

void key_phi_shifted(int64_t n, const BwdConfig& c, Rows& f, float shift) {
  for (int64_t t = 0; t < n; ++t) exponentiate_row(f, t, c.F, shift);
}

// From dphi [n, F] of rows f: dx rows (times root, written to dst with row stride `stride`), and the
// partial gradients of W [m, D] and bias [m] accumulated.
void chain(const Rows& f, const float* dphi, int64_t n, const BwdConfig& c, const BwdHead& hp, bool query,
           BwdWorkspace& w, float* dst, int64_t stride, float* dW, float* dbias, bool accumulate = false) {
  const int64_t D = c.D, m = c.m, F = c.F;
  float* du = w.du.data();
  float* dr = w.den.data();  // per row: the gradient of r (den is free here)
  for (int64_t t = 0; t < n; ++t) {
    const float* ph = f.phi.data() + t * F;
    const float* g = dphi + t * F;
    float* dur = du + t * m;
    float s = 0.f;
    if (c.kind == KIND_EXP) {
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < m; ++i) {
        const float de = g[i] * ph[i];
        dbias[i] += de;
        dur[i] = hp.freq * de;
        s += de;
      }
    } else if (c.kind == KIND_HYP || (c.kind == KIND_NORM_HYP && query && !c.norm_queries)) {
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < m; ++i) {
        const float dp = g[i] * ph[i], dm = g[m + i] * ph[m + i];
        dbias[i] += dp + dm;
        dur[i] = hp.freq * (dp - dm);
        s += dp + dm;
      }
    } else if (c.kind == KIND_NORM_HYP) {
      // hedgehog keys: phi = exp(e - lse(e) - shift), so de = dphi phi - softmax(e) sum(dphi phi), with
      // softmax(e) = phi / sum(phi) (whatever the shift); the row's r cancels in e - lse (dr = 0)
      float sde = 0.f, sph = 0.f;
#pragma omp simd reduction(+ : sde, sph)
      for (int64_t i = 0; i < F; ++i) {
        sde += g[i] * ph[i];
        sph += ph[i];
      }
      const float k = sph > 0.f ? sde / sph : 0.f;
      for (int64_t i = 0; i < m; ++i) {
        const float dp = (g[i] - k) * ph[i], dm = (g[m + i] - k) * ph[m + i];
        dbias[i] += dp + dm;
        dur[i] = hp.freq * (dp - dm);
      }
    } else {  // phi = [E cos a, E sin a]: de = dphi . phi, da = -dphi_c phi_s + dphi_s phi_c
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < m; ++i) {
        const float de = g[i] * ph[i] + g[m + i] * ph[m + i];
        dbias[i] += de;
        dur[i] = hp.freq * (g[m + i] * ph[i] - g[i] * ph[m + i]);
        s += de;
      }
    }
    dr[t] = s;
  }
  float* dxt = w.dxt.data();
  gemm(n, D, m, du, m, hp.W, D, dxt, D, false);  // [n, m] @ [m, D]
  transpose(du, n, m, w.duT.data());
  gemm(m, D, n, w.duT.data(), n, f.xt.data(), D, dW, D, true);  // dW += du^T x'
  for (int64_t t = 0; t < n; ++t) {
    const float* x = f.x.data() + t * D;
    const float* xt = f.xt.data() + t * D;
    float* g = dxt + t * D;
    float* out = dst + t * stride;
    const float kt = 2.f * c.c_t * dr[t], ko = 2.f * c.c_o * dr[t];
    for (int64_t d = 0; d < D; ++d) {
      float gx = g[d] + kt * xt[d];
      if (hp.psi) gx = query ? gx * hp.psi[d] : gx / hp.psi[d];
      out[d] = accumulate ? out[d] + (gx + ko * x[d]) * c.root : (gx + ko * x[d]) * c.root;
    }
  }
}

// a_t = g_t / den_s into w.A and beta_t into w.beta from num, den and the output gradient rows; keeps
// den_s and beta of the rows in `dens`, `betas` for the backward walk.
void row_grads(const float* go, int64_t stride, int64_t n, const BwdConfig& c, BwdWorkspace& w, float* dens,
               float* betas) {
  const int64_t Dv = c.Dv;
  for (int64_t t = 0; t < n; ++t) {
    const float* g = go + t * stride;
    const float dabs = std::fabs(w.den[t]);
    const float ds = std::max(dabs, c.den_eps);
    const float inv = 1.f / ds;
    float gdot = 0.f;
#pragma omp simd reduction(+ : gdot)
    for (int64_t d = 0; d < Dv; ++d) gdot += g[d] * (w.num[t * Dv + d] * inv);
    const float sign = w.den[t] > 0.f ? 1.f : (w.den[t] < 0.f ? -1.f : 0.f);
    const float beta = dabs >= c.den_eps ? -gdot * sign * inv : 0.f;
    for (int64_t d = 0; d < Dv; ++d) w.A[t * Dv + d] = g[d] * inv;
    w.beta[t] = beta;
    dens[t] = ds;
    betas[t] = beta;
  }
}

void load_a(const float* go, int64_t stride, int64_t n, int64_t Dv, const float* dens, const float* betas,
            BwdWorkspace& w) {
  for (int64_t t = 0; t < n; ++t) {
    const float inv = 1.f / dens[t];
    for (int64_t d = 0; d < Dv; ++d) w.A[t * Dv + d] = go[t * stride + d] * inv;
    w.beta[t] = betas[t];
  }
}

// x [n, F] += a [n] z [F]^T
inline void add_outer(int64_t n, int64_t F, const float* a, const float* z, float* x) {
  for (int64_t t = 0; t < n; ++t) {
    float* r = x + t * F;
    const float at = a[t];
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) r[f] += at * z[f];
  }
}

void load_v(const float* src, int64_t stride, int64_t n, int64_t Dv, BwdWorkspace& w) {
  for (int64_t t = 0; t < n; ++t) std::memcpy(w.vb.data() + t * Dv, src + t * stride, sizeof(float) * Dv);
  transpose(w.vb.data(), n, Dv, w.vT.data());
}

struct BSpan {
  int64_t b, start, T;
};

struct Tensors {  // fp32, contiguous
  const float *q, *k, *v, *go;
  float *dq, *dk, *dv;
  int64_t sq, sk, sv, so;   // row strides (per token)
  int64_t bq, bk, bv, bo;   // batch strides
};

// One (sequence, key/value head) task and the G query heads of its group.
void backward_group(const Tensors& X, const bool* keep, const BSpan& span, int64_t hk, int64_t G,
                    const BwdConfig& c, const BwdHead& hp, BwdWorkspace& w, const float* S0, const float* z0,
                    float m0, const float* Sfin, const float* zfin, float mfin, const float* dSfin,
                    const float* dzfin, bool causal, float* dW, float* dbias, float* dS0, float* dz0) {
  const int64_t T = span.T, F = c.F, Dv = c.Dv, D = c.D;
  const int64_t b = span.b, t0 = span.start;
  const float* kp = X.k + b * X.bk + t0 * X.sk + hk * D;
  const float* vp = X.v + b * X.bv + t0 * X.sv + hk * Dv;
  const float* qp = X.q + b * X.bq + t0 * X.sq + hk * G * D;   // + g * D for head g of the group
  const float* gp = X.go + b * X.bo + t0 * X.so + hk * G * Dv;  // + g * Dv
  float* dqp = X.dq + b * X.bq + t0 * X.sq + hk * G * D;
  float* dkp = X.dk + b * X.bk + t0 * X.sk + hk * D;
  float* dvp = X.dv + b * X.bv + t0 * X.sv + hk * Dv;
  float* dST = w.dST.data();
  float* dz = w.dz.data();
  // the final state's gradient seeds the carried one
  if (dSfin) {
    transpose(dSfin, F, Dv, dST);
  } else {
    std::fill(w.dST.begin(), w.dST.end(), 0.f);
  }
  if (dzfin) {
    std::memcpy(dz, dzfin, sizeof(float) * F);
  } else {
    std::fill(w.dz.begin(), w.dz.end(), 0.f);
  }
  const int64_t nch = (T + BCHUNK - 1) / BCHUNK;
  std::vector<float> dens(G * T), betas(G * T);
  float* pq = w.qr.phi.data();
  float* pk = w.kr.phi.data();
  auto add_query_to_dstate = [&](int64_t n) {  // dS^T += A^T pq, dz += beta^T pq (w.AT = A^T made)
    gemm(Dv, F, n, w.AT.data(), n, pq, F, dST, F, true);
    for (int64_t t = 0; t < n; ++t) {
      const float bt = w.beta[t];
      const float* pr = pq + t * F;
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) dz[f] += bt * pr[f];
    }
  };
  auto key_grads = [&](int64_t n) {  // dv = pk dS (+ dvb), dpk = v dS^T + dz: the state terms
    transpose(dST, Dv, F, w.dS.data());
    gemm(n, Dv, F, pk, F, w.dS.data(), Dv, w.dvb.data(), Dv, false);
    gemm(n, F, Dv, w.vb.data(), Dv, dST, F, w.dpk.data(), F, false);
    for (int64_t t = 0; t < n; ++t) {
      float* r = w.dpk.data() + t * F;
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) r[f] += dz[f];
    }
  };
  auto store_keys = [&](int64_t lo, int64_t n) {
    chain(w.kr, w.dpk.data(), n, c, hp, false, w, dkp + lo * X.sk, X.sk, dW, dbias);
    for (int64_t t = 0; t < n; ++t) std::memcpy(dvp + (lo + t) * X.sv, w.dvb.data() + t * Dv, sizeof(float) * Dv);
  };

  if (!causal) {
    const float shift = std::isinf(mfin) ? 0.f : mfin;
    std::memcpy(w.S.data(), Sfin, sizeof(float) * F * Dv);
    std::memcpy(w.z.data(), zfin, sizeof(float) * F);
    transpose(w.S.data(), F, Dv, w.ST.data());
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t lo = 0; lo < T; lo += BCHUNK) {
        const int64_t n = std::min(BCHUNK, T - lo);
        query_phi(qp + g * D + lo * X.sq, X.sq, n, c, hp, w.qr);
        gemm(n, Dv, F, pq, F, w.S.data(), Dv, w.num.data(), Dv, false);
        for (int64_t t = 0; t < n; ++t) w.den[t] = dot(pq + t * F, w.z.data(), F);
        row_grads(gp + g * Dv + lo * X.so, X.so, n, c, w, dens.data() + g * T + lo, betas.data() + g * T + lo);
        // dphiq = A S^T + beta z
        gemm(n, F, Dv, w.A.data(), Dv, w.ST.data(), F, w.dphi.data(), F, false);
        add_outer(n, F, w.beta.data(), w.z.data(), w.dphi.data());
        transpose(w.A.data(), n, Dv, w.AT.data());
        add_query_to_dstate(n);
        chain(w.qr, w.dphi.data(), n, c, hp, true, w, dqp + g * D + lo * X.sq, X.sq, dW, dbias);
      }
    }
    for (int64_t lo = 0; lo < T; lo += BCHUNK) {
      const int64_t n = std::min(BCHUNK, T - lo);
      key_logits(kp + lo * X.sk, X.sk, keep ? keep + lo : nullptr, n, c, hp, w.kr);
      key_phi_shifted(n, c, w.kr, shift);
      load_v(vp + lo * X.sv, X.sv, n, Dv, w);
      key_grads(n);
      store_keys(lo, n);
    }
    const float alpha = T == 0 ? 1.f : (std::isinf(m0) ? 0.f : std::exp(m0 - shift));
    if (dS0) {
      transpose(dST, Dv, F, dS0);
      scale_inplace(dS0, F * Dv, alpha);
      for (int64_t f = 0; f < F; ++f) dz0[f] = dz[f] * alpha;
    }
    return;
  }

  // Causal, forward walk: the state and the key stabilisers as the forward builds them; dq.
  std::vector<float> shifts(nch), alphas(nch);
  float* S = w.S.data();
  float* z = w.z.data();
  if (S0) {
    std::memcpy(S, S0, sizeof(float) * F * Dv);
    std::memcpy(z, z0, sizeof(float) * F);
  } else {
    std::fill(w.S.begin(), w.S.end(), 0.f);
    std::fill(w.z.begin(), w.z.end(), 0.f);
  }
  float m_state = S0 ? m0 : BNEG_INF;
  for (int64_t ci = 0; ci < nch; ++ci) {
    const int64_t lo = ci * BCHUNK, n = std::min(BCHUNK, T - lo);
    const float cmax = key_logits(kp + lo * X.sk, X.sk, keep ? keep + lo : nullptr, n, c, hp, w.kr);
    const float m_new = std::max(m_state, cmax);
    const float shift = std::isinf(m_new) ? 0.f : m_new;
    // the backward's factor is the reference's exp(m_old - shift) (0 while empty)
    alphas[ci] = std::isinf(m_state) ? 0.f : std::exp(m_state - shift);
    if (m_new != m_state) {
      scale_inplace(S, F * Dv, alphas[ci]);
      scale_inplace(z, F, alphas[ci]);
      m_state = m_new;
    }
    shifts[ci] = shift;
    key_phi_shifted(n, c, w.kr, shift);
    transpose(pk, n, F, w.pkt.data());
    load_v(vp + lo * X.sv, X.sv, n, Dv, w);
    transpose(S, F, Dv, w.ST.data());
    for (int64_t g = 0; g < G; ++g) {
      query_phi(qp + g * D + lo * X.sq, X.sq, n, c, hp, w.qr);
      float* sc = w.sc.data();
      gemm(n, n, F, pq, F, w.pkt.data(), n, sc, n, false, TRI_N);
      for (int64_t t = 0; t < n; ++t) {
        float* row = sc + t * n;
        std::fill(row + t + 1, row + n, 0.f);
        float s = 0.f;
        for (int64_t j = 0; j <= t; ++j) s += row[j];
        w.den[t] = s;
      }
      gemm_lower(n, Dv, sc, n, w.vb.data(), Dv, w.num.data(), Dv);
      gemm(n, Dv, F, pq, F, S, Dv, w.num.data(), Dv, true);
      for (int64_t t = 0; t < n; ++t) w.den[t] += dot(pq + t * F, z, F);
      row_grads(gp + g * Dv + lo * X.so, X.so, n, c, w, dens.data() + g * T + lo, betas.data() + g * T + lo);
      // P[t, j] = a_t . v_j + beta_t for j <= t; dphiq = P pk + A S^T + beta z
      float* P = w.P.data();
      gemm(n, n, Dv, w.A.data(), Dv, w.vT.data(), n, P, n, false, TRI_N);
      for (int64_t t = 0; t < n; ++t) {
        float* row = P + t * n;
        for (int64_t j = 0; j <= t; ++j) row[j] += w.beta[t];
        std::fill(row + t + 1, row + n, 0.f);
      }
      gemm_lower(n, F, P, n, pk, F, w.dphi.data(), F);
      gemm(n, F, Dv, w.A.data(), Dv, w.ST.data(), F, w.dphi.data(), F, true);
      add_outer(n, F, w.beta.data(), z, w.dphi.data());
      chain(w.qr, w.dphi.data(), n, c, hp, true, w, dqp + g * D + lo * X.sq, X.sq, dW, dbias);
    }
    gemm(F, Dv, n, w.pkt.data(), n, w.vb.data(), Dv, S, Dv, true);
    for (int64_t t = 0; t < n; ++t) {
      const float* pr = pk + t * F;
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) z[f] += pr[f];
    }
  }
  // Backward walk: dS, dz carried from the last chunk to the first; dk, dv.
  for (int64_t ci = nch - 1; ci >= 0; --ci) {
    const int64_t lo = ci * BCHUNK, n = std::min(BCHUNK, T - lo);
    key_logits(kp + lo * X.sk, X.sk, keep ? keep + lo : nullptr, n, c, hp, w.kr);
    key_phi_shifted(n, c, w.kr, shifts[ci]);
    load_v(vp + lo * X.sv, X.sv, n, Dv, w);
    key_grads(n);
    for (int64_t g = 0; g < G; ++g) {
      query_phi(qp + g * D + lo * X.sq, X.sq, n, c, hp, w.qr);
      transpose(pq, n, F, w.pqT.data());
      load_a(gp + g * Dv + lo * X.so, X.so, n, Dv, dens.data() + g * T + lo, betas.data() + g * T + lo, w);
      // scT[j, t] = pk_j . pq_t for t >= j: dv += scT A
      float* sc = w.sc.data();
      gemm(n, n, F, pk, F, w.pqT.data(), n, sc, n, false);
      for (int64_t j = 0; j < n; ++j) std::fill(sc + j * n, sc + j * n + j, 0.f);
      gemm(n, Dv, n, sc, n, w.A.data(), Dv, w.dvb.data(), Dv, true);
      // PT[j, t] = v_j . a_t + beta_t for t >= j: dpk += PT pq
      transpose(w.A.data(), n, Dv, w.AT.data());
      float* P = w.P.data();
      gemm(n, n, Dv, w.vb.data(), Dv, w.AT.data(), n, P, n, false);
      for (int64_t j = 0; j < n; ++j) {
        float* row = P + j * n;
        std::fill(row, row + j, 0.f);
        for (int64_t t = j; t < n; ++t) row[t] += w.beta[t];
      }
      gemm(n, F, n, P, n, pq, F, w.dpk.data(), F, true);
      // the chunk's queries join dS, dz (they read the state before this chunk's keys)
      add_query_to_dstate(n);
    }
    store_keys(lo, n);
    scale_inplace(dST, F * Dv, alphas[ci]);
    scale_inplace(dz, F, alphas[ci]);
  }
  if (dS0) {
    transpose(dST, Dv, F, dS0);
    std::memcpy(dz0, dz, sizeof(float) * F);
  }
}

}  // namespace

std::vector<at::Tensor> rf_attention_backward(
    const at::Tensor& do_in, const c10::optional<at::Tensor>& dS_in, const c10::optional<at::Tensor>& dz_in,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& W_in,
    const at::Tensor& bias_in, const at::Tensor& freq_in, const c10::optional<at::Tensor>& psi_in, int64_t kind,
    double c_t, double c_o, double scale, bool causal, const c10::optional<at::Tensor>& mask_in,
    const c10::optional<at::Tensor>& S0_in, const c10::optional<at::Tensor>& z0_in,
    const c10::optional<at::Tensor>& m0_in, const c10::optional<at::Tensor>& Sf_in,
    const c10::optional<at::Tensor>& zf_in, const c10::optional<at::Tensor>& mf_in, double den_eps,
    const c10::optional<at::Tensor>& cu_in) {
  auto given = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  TORCH_CHECK_VALUE(kind == KIND_EXP || kind == KIND_HYP || kind == KIND_TRIG || kind == KIND_NORM_HYP,
                    "unknown feature kind ", kind);
  TORCH_CHECK_VALUE(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4 && do_in.dim() == 4,
                    "q, k, v and the output gradient must be [B, T, H, D]");
  const auto fdt = at::kFloat;
  auto f32 = [&](const at::Tensor& t) { return t.to(fdt).contiguous(); };
  const at::Tensor q = f32(q_in), k = f32(k_in), v = f32(v_in), go = f32(do_in);
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3), Dv = v.size(3);
  const int64_t H = k.size(2);
  TORCH_CHECK_VALUE(H > 0 && Hq % H == 0 && go.sizes() == at::IntArrayRef({B, T, Hq, Dv}),
                    "the output gradient must be [B, T, H, Dv]");
  const int64_t G = Hq / H;
  const int64_t m = W_in.size(1);
  TORCH_CHECK_VALUE(W_in.dim() == 3 && W_in.size(0) == H && W_in.size(2) == D, "W must be [H_kv, m, D]");
  const int64_t F = kind == KIND_EXP ? m : 2 * m;
  TORCH_CHECK_VALUE(causal || (given(Sf_in) && given(zf_in) && given(mf_in)),
                    "the non-causal backward needs the forward's final state");

  std::vector<BSpan> spans;
  if (given(cu_in)) {
    const at::Tensor cu = cu_in->to(at::kLong).contiguous();
    const int64_t* cp = cu.data_ptr<int64_t>();
    const int64_t N = cu.size(0) - 1;
    TORCH_CHECK_VALUE(B == 1 && N >= 1 && cp[0] == 0 && cp[N] == T, "cu_seqlens must match the packed inputs");
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK_VALUE(cp[n + 1] >= cp[n], "cu_seqlens must be non-decreasing");
      spans.push_back({0, cp[n], cp[n + 1] - cp[n]});
    }
  } else {
    for (int64_t b = 0; b < B; ++b) spans.push_back({b, 0, T});
  }
  const int64_t R = static_cast<int64_t>(spans.size());
  auto rows = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name) {
    TORCH_CHECK_VALUE(t.dim() == static_cast<int64_t>(shape.size()) && (t.size(0) == 1 || t.size(0) == R) &&
                          t.sizes().slice(1) == shape.slice(1),
                      name, " must be ", shape, " (or with 1 row), got ", t.sizes());
    return t.to(fdt).expand(shape).contiguous();
  };
  const at::Tensor W = f32(W_in);
  const at::Tensor WT = W.transpose(1, 2).contiguous();
  const at::Tensor bias = rows(bias_in, {R, H, m}, "bias");
  const at::Tensor freq = rows(freq_in, {R, H}, "freq");
  at::Tensor psi;
  if (given(psi_in)) psi = rows(*psi_in, {R, H, D}, "psi");
  at::Tensor mask;
  if (given(mask_in)) mask = mask_in->to(at::kBool).contiguous();
  auto state = [&](const c10::optional<at::Tensor>& t, at::IntArrayRef shape, const char* name) {
    if (!given(t)) return at::Tensor();
    TORCH_CHECK_VALUE(t->sizes() == shape, name, " must be ", shape, ", got ", t->sizes());
    return f32(*t);
  };
  const at::Tensor S0 = state(S0_in, {R, H, F, Dv}, "S0"), z0 = state(z0_in, {R, H, F}, "z0"),
                   m0 = state(m0_in, {R, H}, "log_scale0");
  const at::Tensor Sf = state(Sf_in, {R, H, F, Dv}, "S"), zf = state(zf_in, {R, H, F}, "z"),
                   mf = state(mf_in, {R, H}, "log_scale");
  const at::Tensor dSf = state(dS_in, {R, H, F, Dv}, "dS"), dzf = state(dz_in, {R, H, F}, "dz");

  auto opts = q.options().dtype(fdt);
  at::Tensor dq = at::zeros({B, T, Hq, D}, opts), dk = at::zeros({B, T, H, D}, opts),
             dv = at::zeros({B, T, H, Dv}, opts);
  at::Tensor dWpart = at::zeros({R, H, m, D}, opts), dbias = at::zeros({R, H, m}, opts);
  at::Tensor dS0, dz0;
  if (S0.defined()) {
    dS0 = at::zeros({R, H, F, Dv}, opts);
    dz0 = at::zeros({R, H, F}, opts);
  }
  BwdConfig c{static_cast<int>(kind), static_cast<float>(c_t), static_cast<float>(c_o),
              static_cast<float>(std::sqrt(scale)), D, Dv, m, F, static_cast<float>(den_eps)};
  Tensors X{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), go.data_ptr<float>(),
            dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
            Hq * D, H * D, H * Dv, Hq * Dv, T * Hq * D, T * H * D, T * H * Dv, T * Hq * Dv};
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  const float *S0p = ptr(S0), *z0p = ptr(z0), *m0p = ptr(m0), *Sfp = ptr(Sf), *zfp = ptr(zf), *mfp = ptr(mf);
  const float *dSfp = ptr(dSf), *dzfp = ptr(dzf), *psip = ptr(psi);
  const bool* maskp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const float *Wp = W.data_ptr<float>(), *WTp = WT.data_ptr<float>(), *biasp = bias.data_ptr<float>(),
              *freqp = freq.data_ptr<float>();
  float *dWp = dWpart.data_ptr<float>(), *dbp = dbias.data_ptr<float>(), *dS0p = ptr(dS0), *dz0p = ptr(dz0);

  // Tasks (sequence i / H, head i % H), longest first from a shared counter; each writes only its own
  // rows and its own partials, so the result does not depend on the schedule.
  const int64_t n = R * H;
  std::vector<int64_t> order(n);
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) {
    order[i] = i;
    longest = std::max(longest, spans[i / H].T);
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return spans[a / H].T > spans[b / H].T; });
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::atomic<int64_t> next{0};
  if (n > 0) {
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      BwdWorkspace w(c, std::max<int64_t>(longest, 1));
      for (int64_t j = next++; j < n; j = next++) {
        const int64_t i = order[j], h = i % H;
        const BSpan& span = spans[i / H];
        BwdHead hp{Wp + h * m * D, WTp + h * D * m, biasp + i * m, freqp[i], psip ? psip + i * D : nullptr};
        const bool* keep = maskp ? maskp + span.b * T + span.start : nullptr;
        backward_group(X, keep, span, h, G, c, hp, w, S0p ? S0p + i * F * Dv : nullptr,
                       z0p ? z0p + i * F : nullptr, m0p ? m0p[i] : BNEG_INF, Sfp ? Sfp + i * F * Dv : nullptr,
                       zfp ? zfp + i * F : nullptr, mfp ? mfp[i] : BNEG_INF, dSfp ? dSfp + i * F * Dv : nullptr,
                       dzfp ? dzfp + i * F : nullptr, causal, dWp + i * m * D, dbp + i * m,
                       dS0p ? dS0p + i * F * Dv : nullptr, dz0p ? dz0p + i * F : nullptr);
      }
    });
  }
  // dW: the tasks' partials summed over the sequences, in sequence order.
  at::Tensor dW = at::zeros({H, m, D}, opts);
  float* dWo = dW.data_ptr<float>();
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t r = 0; r < R; ++r) {
        const float* src = dWp + (r * H + h) * m * D;
        float* dst = dWo + h * m * D;
#pragma omp simd
        for (int64_t e = 0; e < m * D; ++e) dst[e] += src[e];
      }
  });
  return {dq, dk, dv, dW, dbias, dS0, dz0};
}

// The hybrid window's backward (one translation unit with the helpers above).
#include "rf_window_bwd.cpp"
