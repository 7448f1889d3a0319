// Fused backward of the hybrid window (the gradients of rf_window.cpp's forward, causal and not, sinks and the
// learned factor included; the non-causal walks are described in window_backward_group and csrc/README.md). #included at the end of rf_backward.cpp: one translation unit with the plain backward's
// helpers (feature recomputation, `chain`, the workspace).
//
// Per (sequence, key/value head) task, over the extended keys e (the initial tail's W - 1 rows, then the
// tokens; query t sits at extended position t + W - 1), with the G query heads of its group. Every query row
// t has, as the forward computes them, a feature part num_f/den_f (the state lagging W keys behind, on the
// stabilisers qs_t + ks) and an exact part over the band [t, t + W - 1] and the visible sinks (logits
// l_te = x.y + exact_sq (|x|^2 + |y|^2) + log_mix), put on one scale `top`: ae = exp(le - top),
// af = exp(qs + ks - top), den = den_e ae + den_f af. With g = dL/do_t, den_s = max(|den|, eps),
// A_t = g / den_s and beta_t = -(g . o_t) sign(den) / den_s (0 where the floor is active):
//   * exact key e: weight w_te = exp(l_te - top), dl_te = w_te (A_t . v_e + beta_t): dx_t += dl (y_e +
//     2 exact_sq x_t), dy_e += dl (x_t + 2 exact_sq y_e), dv_e += w_te A_t, dlog_mix += dl;
//   * feature keys: the plain backward (rf_backward.cpp) with a_t = af A_t and beta_t = af beta_t per row,
//     the intra-chunk products strictly lower (W = 0, sinks only: lower with the diagonal).
// A forward walk recomputes the state, the key stabilisers (per chunk of 64, the forward's), both parts
// and each row's scales; it gives dq, the band's and the sinks' gradients (added to the key rows and to
// the sink slots) and keeps per query row af / den_s and af beta. A backward walk carries dS, dz from the
// final state's gradient to the first chunk (moved back by the forward's rescaling factors) and gives the
// feature keys' dk, dv; after it, dS0, dz0. The final tail's gradient is added to the extended keys it
// holds. Nothing of size [T, F] is formed; fp32 throughout; each task writes its own rows, its own dW,
// dbias, dlog_mix partials (summed in a fixed order afterwards): deterministic.

namespace {

struct WinBwdBuffers {
  std::vector<float> kb, vb, vbT, y, yT, ysq, colsum, el, wm, pg, dlT, wmT, dyb, dvb, dtmp, qs, ahat, bhat;
  std::vector<float> sy, sysq, sl, dsy, dsv;
  std::vector<float> pkb, pkbT, dpkb, dvfb, scb, pb, scbT, pbT;  // non-causal: the band's feature keys
  std::vector<char> kp;
  std::vector<int64_t> kept_before;
  void ensure(const BwdConfig& c, int64_t rows, int64_t cols, int64_t S) {
    const int64_t D = c.D, Dv = c.Dv;
    kb.resize(cols * D);
    vb.resize(cols * Dv);
    vbT.resize(Dv * cols);
    y.resize(cols * D);
    yT.resize(D * cols);
    ysq.resize(cols);
    colsum.resize(cols);
    el.resize(rows * cols);
    wm.resize(rows * cols);
    pg.resize(rows * cols);
    dlT.resize(cols * rows);
    wmT.resize(cols * rows);
    dyb.resize(cols * D);
    dvb.resize(cols * Dv);
    dtmp.resize(BCHUNK * D);
    qs.resize(rows);
    ahat.resize(rows * Dv);
    bhat.resize(rows);
    kp.resize(cols);
    kept_before.resize(cols + 1);
    sy.resize(S * D);
    sysq.resize(S);
    sl.resize(std::max<int64_t>(rows * S, 1));
    dsy.resize(S * D);
    dsv.resize(S * Dv);
    for (auto* v : {&pkb, &pkbT, &dpkb}) v->resize(cols * c.F);
    dvfb.resize(cols * Dv);
    for (auto* v : {&scb, &pb, &scbT, &pbT}) v->resize(rows * cols);
  }
};

// The extended keys of one task and where their gradients go.
struct WinExt {
  const float *kt, *vt;  // the initial tail [nt, D], [nt, Dv]
  const bool* tkeep;     // [nt]
  const float *k, *v;    // token 0 of the sequence and head (row strides sk, sv)
  int64_t sk, sv;
  const bool* keep;      // the padding mask of the sequence, or nullptr
  int64_t skip, nt, D, Dv;
  float *dkt, *dvt;      // the initial tail's gradient [nt, .]
  float *dk, *dv;        // the tokens' gradient rows (strides sk, sv)

  void stage(int64_t e0, int64_t n, float* kr, float* vr, char* kp) const {
    for (int64_t r = 0; r < n; ++r) {
      const int64_t e = e0 + r;
      if (e < nt) {
        std::memcpy(kr + r * D, kt + e * D, sizeof(float) * D);
        std::memcpy(vr + r * Dv, vt + e * Dv, sizeof(float) * Dv);
        kp[r] = tkeep[e];
      } else {
        const int64_t j = e - nt;
        std::memcpy(kr + r * D, k + j * sk, sizeof(float) * D);
        std::memcpy(vr + r * Dv, v + j * sv, sizeof(float) * Dv);
        kp[r] = (keep ? keep[j] : true) && j >= skip;
      }
    }
  }
  bool kept(int64_t e) const {
    if (e < nt) return tkeep[e];
    const int64_t j = e - nt;
    return (keep ? keep[j] : true) && j >= skip;
  }
  float* dk_row(int64_t e) const { return e < nt ? dkt + e * D : dk + (e - nt) * sk; }
  float* dv_row(int64_t e) const { return e < nt ? dvt + e * Dv : dv + (e - nt) * sv; }
};

struct WinSinks {
  const float *k = nullptr, *v = nullptr;  // [S, D], [S, Dv] raw
  const int64_t* from = nullptr;           // [S]: the first query that sees the slot
  int64_t S = 0;
  float log_mix = 0.f;
};

// The forward's combine_row scales (rf_window.cpp): ae, af and the shared shift `top` of one row; false
// when the row has no visible key (its output is 0).
inline bool combine_scales(float den_e, float le, float den_f, float lf, bool has_f, float& ae, float& af,
                           float& top) {
  const bool has_e = le != BNEG_INF && den_e > 0.f;
  has_f = has_f && std::isfinite(lf);
  ae = af = top = 0.f;
  if (!has_e && !has_f) return false;
  const float ce = has_e ? le + std::log(den_e) : BNEG_INF;
  const float cf = has_f ? lf + (den_f != 0.f ? std::log(std::fabs(den_f)) : 0.f) : BNEG_INF;
  top = std::max(ce, cf);
  ae = has_e ? std::exp(le - top) : 0.f;
  af = has_f ? std::exp(lf - top) : 0.f;
  return true;
}

// Query exponents -> stabilised features (each row its own maximum, kept in qs), as the forward's.
void query_phi_shift(const float* src, int64_t stride, int64_t n, const BwdConfig& c, const BwdHead& hp, Rows& f,
                     float* qs) {
  logits(src, stride, n, c, hp, true, f);
  for (int64_t t = 0; t < n; ++t) {
    qs[t] = row_max(f.phi.data() + t * c.F, c.F);
    exponentiate_row(f, t, c.F, qs[t]);
  }
}

void window_backward_group(const Tensors& X, const WinExt& ext, const BSpan& span, int64_t hk, int64_t G,
                           const BwdConfig& c, const BwdHead& hp, BwdWorkspace& w, WinBwdBuffers& wb, bool causal,
                           int64_t W, float exact_sq, const WinSinks& sk, const float* S0, const float* z0,
                           float m0, const float* dSfin, const float* dzfin, const float* dktf, const float* dvtf,
                           float* dW, float* dbias, float* dS0, float* dz0, float* dsk, float* dsv, float& dmix,
                           const float* o_all, const float* st_all, float kshift) {
  const int64_t T = span.T, F = c.F, Dv = c.Dv, D = c.D, nt = ext.nt;
  const int64_t b = span.b, t0 = span.start;
  const int64_t diag = W == 0 ? 1 : 0;  // W = 0: a chunk's feature keys include each query's own
  // exact keys [t, t + W - 1] (causal) or [t, t + 2W - 2] (extended; none for W = 0)
  const int64_t band = W == 0 ? 0 : (causal ? W : 2 * W - 1);
  const int64_t L = T + nt;
  const int64_t NS = sk.S;
  const float* qp = X.q + b * X.bq + t0 * X.sq + hk * G * D;
  const float* gp = X.go + b * X.bo + t0 * X.so + hk * G * Dv;
  float* dqp = X.dq + b * X.bq + t0 * X.sq + hk * G * D;
  // causal with the forward's per-row (top, den) and output: the rows' scales come from them, and neither
  // part's numerator is recomputed
  const bool fast = o_all && st_all;  // (always, non-causal)
  const float* obp = fast ? o_all + b * X.bo + t0 * X.so + hk * G * Dv : nullptr;
  const int64_t sst = (X.sq / D) * 2;  // stats [B, T, H, 2]: row stride
  const float* stb = fast ? st_all + (b * (X.bq / X.sq) + t0) * sst + hk * G * 2 : nullptr;
  const int64_t rows_max = std::min(BCHUNK, std::max<int64_t>(T, 1));
  wb.ensure(c, rows_max, rows_max + (causal ? nt : 2 * nt), NS);
  // the final tail (extended keys [T, T + nt)) takes its state gradient
  for (int64_t r = 0; r < nt; ++r) {
    if (dktf) {
      float* dst = ext.dk_row(T + r);
      for (int64_t d = 0; d < D; ++d) dst[d] += dktf[r * D + d];
    }
    if (dvtf) {
      float* dst = ext.dv_row(T + r);
      for (int64_t d = 0; d < Dv; ++d) dst[d] += dvtf[r * Dv + d];
    }
  }
  // the sinks as the exact part reads them
  for (int64_t s = 0; s < NS; ++s) {
    float q2 = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float yv = sk.k[s * D + d] * c.root;
      wb.sy[s * D + d] = yv;
      q2 += yv * yv;
    }
    wb.sysq[s] = exact_sq * q2;
  }
  std::fill(wb.dsy.begin(), wb.dsy.end(), 0.f);
  std::fill(wb.dsv.begin(), wb.dsv.end(), 0.f);
  double mix_acc = 0.0;

  const int64_t nch = (T + BCHUNK - 1) / BCHUNK;
  std::vector<float> shifts(nch), alphas(nch), fa(G * T), fb(G * T);
  float* S = w.S.data();
  float* z = w.z.data();
  std::memcpy(S, S0, sizeof(float) * F * Dv);
  std::memcpy(z, z0, sizeof(float) * F);
  const bool state_nonempty = !std::isinf(m0);
  float m_state = m0;
  int64_t kept_folded = 0;
  float* pq = w.qr.phi.data();
  float* pk = w.kr.phi.data();
  char* kp = wb.kp.data();
  // non-causal (the forward's walks, rf_window.cpp): every feature key on the forward's key shift ks_all (its
  // maximum over the extended keys and the initial state). A reverse walk rebuilds the suffix snapshots Q_c
  // and, from each row's saved (top, den) and output, each chunk's gradient of the state its queries read,
  // dR_c = sum_t ahat_t pq_t^T (dz: sum_t bhat_t pq_t; [Dv, F] then [F]), with their sums over the later
  // chunks DP_c (the gradient that reaches a key of chunk c through the prefix states of later chunks); it
  // also finds m_fin (the final state's shift: the maximum over the extended keys [0, T)).
  float ks_all = 0.f, m_fin = m0;
  int64_t kept_total = 0;
  const int64_t up = std::max<int64_t>(band - 1, 0);  // the region reaches `up` keys past its chunk
  auto region_cols = [&](int64_t lo) { return std::min(std::min(BCHUNK, T - lo) + up, L - lo); };
  const int64_t FS = F * Dv + F;
  std::vector<float> qsnap, qshift, dRs, DPs, Pn, zP, zR;
  std::vector<int64_t> cnt;
  if (!causal) {
    ks_all = std::isinf(kshift) ? 0.f : kshift;
    cnt.resize(L + 1);
    cnt[0] = 0;
    for (int64_t e = 0; e < L; ++e) cnt[e + 1] = cnt[e] + (ext.kept(e) ? 1 : 0);
    kept_total = cnt[L];
    qsnap.resize(nch * FS);
    qshift.resize(nch);
    dRs.assign(nch * FS, 0.f);
    DPs.resize(nch * FS);
    float* Q = w.S.data();
    float* zq = w.z.data();
    std::fill(Q, Q + F * Dv, 0.f);
    std::fill(zq, zq + F, 0.f);
    float q_shift = BNEG_INF;
    auto walk = [&](int64_t a, int64_t bnd, bool fold) {
      for (int64_t hi = bnd; hi > a;) {
        int64_t lo_k = std::max(a, hi - BCHUNK);
        if (hi > T && lo_k < T) lo_k = T;
        const int64_t nk = hi - lo_k;
        ext.stage(lo_k, nk, wb.kb.data(), wb.vb.data(), kp);
        const float cmax = key_logits(wb.kb.data(), D, reinterpret_cast<const bool*>(kp), nk, c, hp, w.kr);
        if (hi <= T) m_fin = std::max(m_fin, cmax);
        if (fold) {
          const float m_new = std::max(q_shift, cmax);
          const float shift = std::isinf(m_new) ? 0.f : m_new;
          if (m_new != q_shift) {
            const float alpha = std::isinf(q_shift) ? 0.f : std::exp(q_shift - shift);
            scale_inplace(Q, F * Dv, alpha);
            scale_inplace(zq, F, alpha);
            q_shift = m_new;
          }
          key_phi_shifted(nk, c, w.kr, shift);
          transpose(pk, nk, F, w.pkt.data());
          gemm(F, Dv, nk, w.pkt.data(), nk, wb.vb.data(), Dv, Q, Dv, true);
          for (int64_t t = 0; t < nk; ++t)
            for (int64_t f = 0; f < F; ++f) zq[f] += pk[t * F + f];
        }
        hi = lo_k;
      }
    };
    std::vector<float> run(FS, 0.f);
    int64_t cursor = L;
    for (int64_t ci = nch - 1; ci >= 0; --ci) {
      const int64_t lo = ci * BCHUNK, n = std::min(BCHUNK, T - lo);
      const int64_t e = lo + region_cols(lo);
      walk(e, cursor, true);
      cursor = std::min(cursor, e);
      std::memcpy(qsnap.data() + ci * FS, Q, sizeof(float) * F * Dv);
      std::memcpy(qsnap.data() + ci * FS + F * Dv, zq, sizeof(float) * F);
      qshift[ci] = q_shift;
      std::memcpy(DPs.data() + ci * FS, run.data(), sizeof(float) * FS);
      float* dRc = dRs.data() + ci * FS;
      for (int64_t g = 0; g < G; ++g) {
        query_phi_shift(qp + g * D + lo * X.sq, X.sq, n, c, hp, w.qr, wb.qs.data());
        for (int64_t t = 0; t < n; ++t) {
          const int64_t q_e = lo + t;  // the row's band: the extended keys [q_e, q_e + band)
          const int64_t inband = band > 0 ? cnt[std::min(q_e + band, L)] - cnt[q_e] : 0;
          const bool has_f = state_nonempty || kept_total - inband > 0;
          const float* st = stb + g * 2 + q_e * sst;
          float* A = w.A.data() + t * Dv;
          const float top = st[0];
          if (top == BNEG_INF || !has_f) {
            std::fill(A, A + Dv, 0.f);
            w.beta[t] = fa[g * T + q_e] = fb[g * T + q_e] = 0.f;
            continue;
          }
          const float a_f = std::exp(wb.qs[t] + ks_all - top);
          const float den = st[1], dabs = std::fabs(den);
          const float iv = 1.f / std::max(dabs, c.den_eps);
          const float* go = gp + g * Dv + q_e * X.so;
          const float gdot = dot(go, obp + g * Dv + q_e * X.so, Dv);
          const float sign = den > 0.f ? 1.f : (den < 0.f ? -1.f : 0.f);
          const float bt = dabs >= c.den_eps ? -gdot * sign * iv : 0.f;
          fa[g * T + q_e] = a_f * iv;
          fb[g * T + q_e] = a_f * bt;
          for (int64_t d = 0; d < Dv; ++d) A[d] = go[d] * fa[g * T + q_e];
          w.beta[t] = fb[g * T + q_e];
        }
        transpose(w.A.data(), n, Dv, w.AT.data());
        gemm(Dv, F, n, w.AT.data(), n, pq, F, dRc, F, true);
        for (int64_t t = 0; t < n; ++t) {
          const float bt = w.beta[t];
          const float* pr = pq + t * F;
          for (int64_t f = 0; f < F; ++f) dRc[F * Dv + f] += bt * pr[f];
        }
      }
      for (int64_t i = 0; i < FS; ++i) run[i] += dRc[i];
    }
    walk(0, cursor, false);  // the first region's keys: m_fin only
    // the gradient of every chunk's read state: the initial state's share (below)
    std::memcpy(w.dST.data(), run.data(), sizeof(float) * F * Dv);
    std::memcpy(w.dz.data(), run.data() + F * Dv, sizeof(float) * F);
    // the prefix P on ks_all (the initial state first); R = P + Q_c in S^T (w.ST) and zR
    Pn.resize(F * Dv);
    zP.resize(F);
    zR.resize(F);
    const float a0 = std::isinf(m0) ? 0.f : std::exp(m0 - ks_all);
    for (int64_t i = 0; i < F * Dv; ++i) Pn[i] = S0[i] * a0;
    for (int64_t f = 0; f < F; ++f) zP[f] = z0[f] * a0;
  }
  // non-causal: the final state's gradient reaches the keys [0, T) moved from its shift to ks_all, gS [Dv, F]
  // and gz; DQ: the gradient that reaches a key through the suffix states of earlier chunks (the chunks c'
  // with E_c' <= the key, summed as the walk passes them)
  std::vector<float> gS, DQ, Gt, Gm;
  int64_t qptr = 0;
  const float gamma = causal || std::isinf(m_fin) ? 0.f : std::exp(std::min(ks_all - m_fin, 80.f));
  if (!causal) {
    gS.assign(FS, 0.f);
    if (dSfin)
      for (int64_t f = 0; f < F; ++f)
        for (int64_t d = 0; d < Dv; ++d) gS[d * F + f] = gamma * dSfin[f * Dv + d];
    if (dzfin)
      for (int64_t f = 0; f < F; ++f) gS[F * Dv + f] = gamma * dzfin[f];
    DQ.assign(FS, 0.f);
    Gt.resize(FS);
    Gm.resize(F * Dv);
  }
  // non-causal: the region rows [a0, a1) (extended keys lo + a0 ..) are final: their state terms (the
  // prefix's DPc, the suffix's DQ, the final state's below T) join their carried feature gradients, then
  // one chain per key
  auto finish_keys = [&](int64_t lo, int64_t a0, int64_t a1, const float* DPc) {
    for (int64_t a = a0; a < a1;) {
      const int64_t j = lo + a;
      while (qptr < nch && qptr * BCHUNK + region_cols(qptr * BCHUNK) <= j) {
        const float* d = dRs.data() + qptr * FS;
        for (int64_t i = 0; i < FS; ++i) DQ[i] += d[i];
        ++qptr;
      }
      int64_t bnd = a1;
      if (qptr < nch) bnd = std::min(bnd, qptr * BCHUNK + region_cols(qptr * BCHUNK) - lo);
      if (j < T) bnd = std::min(bnd, T - lo);
      const int64_t nb = bnd - a;
      for (int64_t i = 0; i < FS; ++i) Gt[i] = DPc[i] + DQ[i] + (j < T ? gS[i] : 0.f);
      transpose(Gt.data(), Dv, F, Gm.data());  // [F, Dv]
      gemm(nb, Dv, F, wb.pkb.data() + a * F, F, Gm.data(), Dv, wb.dvfb.data() + a * Dv, Dv, true);
      gemm(nb, F, Dv, wb.vb.data() + a * Dv, Dv, Gt.data(), F, wb.dpkb.data() + a * F, F, true);
      for (int64_t r = a; r < bnd; ++r)
        for (int64_t f = 0; f < F; ++f) wb.dpkb[r * F + f] += Gt[F * Dv + f];
      a = bnd;
    }
    for (int64_t j0 = a0; j0 < a1; j0 += BCHUNK) {
      const int64_t nj = std::min(BCHUNK, a1 - j0);
      key_logits(wb.kb.data() + j0 * D, D, reinterpret_cast<const bool*>(kp + j0), nj, c, hp, w.kr);
      key_phi_shifted(nj, c, w.kr, ks_all);
      float* dtmp = wb.dtmp.data();
      chain(w.kr, wb.dpkb.data() + j0 * F, nj, c, hp, false, w, dtmp, D, dW, dbias);
      for (int64_t t = 0; t < nj; ++t) {
        float* dk = ext.dk_row(lo + j0 + t);
        float* dv = ext.dv_row(lo + j0 + t);
        for (int64_t d = 0; d < D; ++d) dk[d] += dtmp[t * D + d];
        for (int64_t d = 0; d < Dv; ++d) dv[d] += wb.dvfb[(j0 + t) * Dv + d];
      }
    }
  };
  int64_t have = 0;  // non-causal: region rows carried from the previous chunk (features and gradients)

  // ---- forward walk
  for (int64_t ci = 0; ci < nch; ++ci) {
    const int64_t lo = ci * BCHUNK, n = std::min(BCHUNK, T - lo);
    // the staged extended keys [lo, lo + cols): causal, the chunk's n feature keys and the band after them;
    // non-causal, the band region (none for W = 0)
    const int64_t cols = causal ? n + nt : region_cols(lo);
    ext.stage(lo, cols, wb.kb.data(), wb.vb.data(), kp);
    wb.kept_before[0] = 0;
    for (int64_t j = 0; j < cols; ++j) wb.kept_before[j + 1] = wb.kept_before[j] + (kp[j] ? 1 : 0);
    float ks = ks_all;
    if (!causal) {
      // the region's feature keys at the shared shift: pkb [cols, F] (the rows carried keep theirs), pkbT
      for (int64_t j0 = have; j0 < cols; j0 += BCHUNK) {
        const int64_t nj = std::min(BCHUNK, cols - j0);
        key_logits(wb.kb.data() + j0 * D, D, reinterpret_cast<const bool*>(kp + j0), nj, c, hp, w.kr);
        key_phi_shifted(nj, c, w.kr, ks_all);
        std::memcpy(wb.pkb.data() + j0 * F, pk, sizeof(float) * nj * F);
      }
      transpose(wb.pkb.data(), cols, F, wb.pkbT.data());
      transpose(wb.vb.data(), cols, Dv, wb.vbT.data());
      std::fill(wb.dpkb.begin() + have * F, wb.dpkb.begin() + cols * F, 0.f);
      std::fill(wb.dvfb.begin() + have * Dv, wb.dvfb.begin() + cols * Dv, 0.f);
      // the state the chunk's queries read, R = P + exp(shift_c - ks_all) Q_c: transposed in w.ST, zR
      const float* Qc = qsnap.data() + ci * FS;
      const float as = std::isinf(qshift[ci]) ? 0.f : std::exp(qshift[ci] - ks_all);
      float* Rm = w.S.data();
      for (int64_t i = 0; i < F * Dv; ++i) Rm[i] = Pn[i] + as * Qc[i];
      for (int64_t f = 0; f < F; ++f) zR[f] = zP[f] + as * Qc[F * Dv + f];
      transpose(Rm, F, Dv, w.ST.data());
    }
    if (causal) {
    const float cmax = key_logits(wb.kb.data(), D, reinterpret_cast<const bool*>(kp), n, c, hp, w.kr);
    const float m_new = std::max(m_state, cmax);
    const float shift = std::isinf(m_new) ? 0.f : m_new;
    alphas[ci] = std::isinf(m_state) ? 0.f : std::exp(m_state - shift);
    if (m_new != m_state) {
      scale_inplace(S, F * Dv, alphas[ci]);
      scale_inplace(z, F, alphas[ci]);
      m_state = m_new;
    }
    shifts[ci] = shift;
    ks = std::isinf(m_state) ? 0.f : m_state;
    key_phi_shifted(n, c, w.kr, shift);
    transpose(pk, n, F, w.pkt.data());
    load_v(wb.vb.data(), Dv, n, Dv, w);
    transpose(S, F, Dv, w.ST.data());
    }
    if (band > 0) {
      for (int64_t e = 0; e < cols; ++e) {
        float q2 = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const float yv = wb.kb[e * D + d] * c.root;
          wb.y[e * D + d] = yv;
          q2 += yv * yv;
        }
        wb.ysq[e] = exact_sq * q2;
      }
      transpose(wb.y.data(), cols, D, wb.yT.data());
      transpose(wb.vb.data(), cols, Dv, wb.vbT.data());
      std::fill(wb.dyb.begin(), wb.dyb.begin() + cols * D, 0.f);
      std::fill(wb.dvb.begin(), wb.dvb.begin() + cols * Dv, 0.f);
      std::fill(wb.colsum.begin(), wb.colsum.begin() + cols, 0.f);
    }
    for (int64_t g = 0; g < G; ++g) {
      query_phi_shift(qp + g * D + lo * X.sq, X.sq, n, c, hp, w.qr, wb.qs.data());
      const float* x = w.qr.x.data();  // sqrt(scale) q, as the exact part reads it
      // the feature part
      if (fast) {
        // (its numerator and denominator are not needed: the row's scales are the forward's)
      } else if (causal) {
        float* sc = w.sc.data();
        gemm(n, n, F, pq, F, w.pkt.data(), n, sc, n, false, TRI_N);
        for (int64_t t = 0; t < n; ++t) {
          float* row = sc + t * n;
          std::fill(row + t + diag, row + n, 0.f);
          float s = 0.f;
          for (int64_t j = 0; j < t + diag; ++j) s += row[j];
          w.den[t] = s;
        }
        gemm_lower(n, Dv, sc, n, w.vb.data(), Dv, w.num.data(), Dv);
        gemm(n, Dv, F, pq, F, S, Dv, w.num.data(), Dv, true);
        for (int64_t t = 0; t < n; ++t) w.den[t] += dot(pq + t * F, z, F);
      }
      // the exact part: band logits (-inf outside), then the sinks
      float* el = wb.el.data();
      // row block [i, i + R) reads the staged columns [i, i + R - 1 + band) only: the band's products are
      // computed block by block (each row's entries outside its band are set below, never read)
      auto blocks = [&](auto&& fn) {
        for (int64_t i = 0; i < n; i += RB) {
          const int64_t R = std::min<int64_t>(RB, n - i), width = std::min(cols - i, R - 1 + band);
          if (width > 0) fn(i, R, width);
        }
      };
      if (band > 0)
        blocks([&](int64_t i, int64_t R, int64_t width) {
          gemm(R, width, D, x + i * D, D, wb.yT.data() + i, cols, el + i * cols + i, cols, false);
        });
      std::vector<float> le(n), num_e(n * Dv), den_e(n);
      for (int64_t t = 0; t < n; ++t) {
        const float* xr = x + t * D;
        const float xsq = exact_sq != 0.f ? exact_sq * dot(xr, xr, D) : 0.f;
        float mx = BNEG_INF;
        float* er = el + t * cols;
        float* pr = wb.wm.data() + t * cols;
        if (band > 0) {  // row t reads the extended keys [t, t + W) of the chunk's staged rows
          const int64_t hi = std::min(t + band, cols);
          std::fill(er, er + t, BNEG_INF);
          for (int64_t e = t; e < hi; ++e) er[e] = kp[e] ? er[e] + xsq + wb.ysq[e] : BNEG_INF;
          std::fill(er + hi, er + cols, BNEG_INF);
          mx = row_max(er + t, hi - t);
        }
        float* slr = wb.sl.data() + t * NS;
        for (int64_t s = 0; s < NS; ++s) {
          slr[s] = sk.from[s] <= (causal ? lo + t : T - 1) ? dot(xr, wb.sy.data() + s * D, D) + xsq + wb.sysq[s] : BNEG_INF;
          mx = std::max(mx, slr[s]);
        }
        if (fast) {  // the exact weights on the forward's scale: exp(l + log_mix - top)
          const float top = stb[g * 2 + (lo + t) * sst];
          le[t] = top;
          if (top == BNEG_INF) {
            if (band > 0) std::fill(pr, pr + cols, 0.f);
            for (int64_t s = 0; s < NS; ++s) slr[s] = 0.f;
            continue;
          }
          const float sh = top - sk.log_mix;
          if (band > 0) {
            const int64_t hi = std::min(t + band, cols);
            std::fill(pr, pr + t, 0.f);
            std::memcpy(pr + t, er + t, sizeof(float) * (hi - t));
            exp_shifted(pr + t, hi - t, sh);
            std::fill(pr + hi, pr + cols, 0.f);
          }
          for (int64_t s = 0; s < NS; ++s) slr[s] = slr[s] == BNEG_INF ? 0.f : std::exp(slr[s] - sh);
          continue;
        }
        float* ne = num_e.data() + t * Dv;
        std::fill(ne, ne + Dv, 0.f);
        den_e[t] = 0.f;
        le[t] = mx;
        if (mx == BNEG_INF) {
          if (band > 0) std::fill(pr, pr + cols, 0.f);
          continue;
        }
        if (band > 0) {
          const int64_t hi = std::min(t + band, cols);
          std::fill(pr, pr + t, 0.f);
          std::memcpy(pr + t, er + t, sizeof(float) * (hi - t));
          exp_shifted(pr + t, hi - t, mx);  // exp(-inf) = 0: the masked keys
          std::fill(pr + hi, pr + cols, 0.f);
          den_e[t] = row_sum(pr + t, hi - t);
        }
        for (int64_t s = 0; s < NS; ++s) {
          if (slr[s] == BNEG_INF) continue;
          const float p = std::exp(slr[s] - mx);
          slr[s] = p;  // from here on: the sink's weight relative to the row maximum
          const float* vs = sk.v + s * Dv;
          for (int64_t d = 0; d < Dv; ++d) ne[d] += p * vs[d];
          den_e[t] += p;
        }
        le[t] = mx + sk.log_mix;
      }
      if (band > 0 && !fast)
        blocks([&](int64_t i, int64_t R, int64_t width) {
          gemm(R, Dv, width, wb.wm.data() + i * cols + i, cols, wb.vb.data() + i * Dv, Dv, num_e.data() + i * Dv, Dv,
               true);
        });
      // the scales, o, A, beta per row
      float* ahat = wb.ahat.data();
      float* bhat = wb.bhat.data();
      std::vector<float> ae(n), inv(n), beta(n);
      for (int64_t t = 0; t < n; ++t) {
        bool has_f;
        if (causal) {
          has_f = state_nonempty || kept_folded + wb.kept_before[t + diag] > 0;
        } else {
          const int64_t hi = band > 0 ? std::min(t + band, cols) : t;
          has_f = state_nonempty || kept_total - (band > 0 ? wb.kept_before[hi] - wb.kept_before[t] : 0) > 0;
        }
        float a_e, a_f, top;
        const float* go = gp + g * Dv + (lo + t) * X.so;
        float* A = w.A.data() + t * Dv;
        if (fast) {
          const float* st = stb + g * 2 + (lo + t) * sst;
          top = st[0];
          if (top == BNEG_INF) {
            std::fill(A, A + Dv, 0.f);
            std::fill(ahat + t * Dv, ahat + (t + 1) * Dv, 0.f);
            ae[t] = inv[t] = beta[t] = bhat[t] = 0.f;
            fa[g * T + lo + t] = fb[g * T + lo + t] = 0.f;
            continue;
          }
          a_f = has_f ? std::exp(wb.qs[t] + ks - top) : 0.f;
          const float den = st[1];
          const float dabs = std::fabs(den);
          const float iv = 1.f / std::max(dabs, c.den_eps);
          const float* orow = obp + g * Dv + (lo + t) * X.so;
          const float gdot = dot(go, orow, Dv);
          const float sign = den > 0.f ? 1.f : (den < 0.f ? -1.f : 0.f);
          const float bt = dabs >= c.den_eps ? -gdot * sign * iv : 0.f;
          for (int64_t d = 0; d < Dv; ++d) {
            A[d] = go[d] * iv;
            ahat[t * Dv + d] = A[d] * a_f;
          }
          ae[t] = 1.f;  // the exact weights are already on the row's scale
          inv[t] = iv;
          beta[t] = bt;
          bhat[t] = bt * a_f;
          fa[g * T + lo + t] = a_f * iv;
          fb[g * T + lo + t] = a_f * bt;
          continue;
        }
        if (!combine_scales(den_e[t], le[t], w.den[t], wb.qs[t] + ks, has_f, a_e, a_f, top)) {
          std::fill(A, A + Dv, 0.f);
          std::fill(ahat + t * Dv, ahat + (t + 1) * Dv, 0.f);
          ae[t] = inv[t] = beta[t] = bhat[t] = 0.f;
          fa[g * T + lo + t] = fb[g * T + lo + t] = 0.f;
          continue;
        }
        const float den = den_e[t] * a_e + w.den[t] * a_f;
        const float dabs = std::fabs(den);
        const float ds = std::max(dabs, c.den_eps);
        const float iv = 1.f / ds;
        float gdot = 0.f;
        for (int64_t d = 0; d < Dv; ++d) gdot += go[d] * ((num_e[t * Dv + d] * a_e + w.num[t * Dv + d] * a_f) * iv);
        const float sign = den > 0.f ? 1.f : (den < 0.f ? -1.f : 0.f);
        const float bt = dabs >= c.den_eps ? -gdot * sign * iv : 0.f;
        for (int64_t d = 0; d < Dv; ++d) {
          A[d] = go[d] * iv;
          ahat[t * Dv + d] = A[d] * a_f;
        }
        ae[t] = a_e;
        inv[t] = iv;
        beta[t] = bt;
        bhat[t] = bt * a_f;
        fa[g * T + lo + t] = a_f * iv;
        fb[g * T + lo + t] = a_f * bt;
      }
      // the feature part's dq: P[t, j] = ahat_t . v_j + bhat_t over the visible j; dphi = P pk + ahat S^T + bhat z
      if (causal) {
        float* P = w.P.data();
        gemm(n, n, Dv, ahat, Dv, w.vT.data(), n, P, n, false, TRI_N);
        for (int64_t t = 0; t < n; ++t) {
          float* row = P + t * n;
          for (int64_t j = 0; j < t + diag; ++j) row[j] += bhat[t];
          std::fill(row + t + diag, row + n, 0.f);
        }
        gemm_lower(n, F, P, n, pk, F, w.dphi.data(), F);
        gemm(n, F, Dv, ahat, Dv, w.ST.data(), F, w.dphi.data(), F, true);
        add_outer(n, F, bhat, z, w.dphi.data());
      } else {
        // R's: dphi = ahat R^T + bhat zR (the read state's own gradient is the reverse walk's dR_c)
        gemm(n, F, Dv, ahat, Dv, w.ST.data(), F, w.dphi.data(), F, false);
        add_outer(n, F, bhat, zR.data(), w.dphi.data());
        // the region's feature keys outside each row's band: the lower block (columns [0, n), r' < r; W = 0:
        // r' <= r) and the upper one (columns up + r', r' > r). There Pm[t, j] = ahat_t . v_j + bhat_t and
        // Sm[t, j] = pq_t . pk_j: dphi += Pm pk, dpkb += Pm^T pq, dvfb += Sm^T ahat
        const int64_t diag_l = band > 0 ? 0 : 1;
        auto block_grads = [&](int64_t col0, int64_t nc, bool lower) {
          float* Pm = w.P.data();
          float* Sm = w.sc.data();
          gemm(n, nc, Dv, ahat, Dv, wb.vbT.data() + col0, cols, Pm, nc, false);
          gemm(n, nc, F, pq, F, wb.pkbT.data() + col0, cols, Sm, nc, false);
          for (int64_t t = 0; t < n; ++t) {
            float* pr = Pm + t * nc;
            float* sr = Sm + t * nc;
            const int64_t a = lower ? 0 : std::min(t + 1, nc), e = lower ? std::min(t + diag_l, nc) : nc;
            std::fill(pr, pr + a, 0.f);
            std::fill(sr, sr + a, 0.f);
            for (int64_t j = a; j < e; ++j) pr[j] += bhat[t];
            std::fill(pr + e, pr + nc, 0.f);
            std::fill(sr + e, sr + nc, 0.f);
          }
          gemm(n, F, nc, Pm, nc, wb.pkb.data() + col0 * F, F, w.dphi.data(), F, true);
          transpose(Pm, n, nc, wb.pbT.data());
          gemm(nc, F, n, wb.pbT.data(), n, pq, F, wb.dpkb.data() + col0 * F, F, true);
          transpose(Sm, n, nc, wb.scbT.data());
          gemm(nc, Dv, n, wb.scbT.data(), n, ahat, Dv, wb.dvfb.data() + col0 * Dv, Dv, true);
        };
        block_grads(0, n, true);
        const int64_t nu = std::min(n, cols - up);
        if (nu > 0) block_grads(up, nu, false);
      }
      float* dqg = dqp + g * D + lo * X.sq;
      chain(w.qr, w.dphi.data(), n, c, hp, true, w, dqg, X.sq, dW, dbias);
      // the exact part's gradients
      float* dx = wb.dtmp.data();
      std::fill(dx, dx + n * D, 0.f);
      std::vector<float> rsum(n, 0.f);
      if (band > 0) {
        float* wm = wb.wm.data();
        float* pg = wb.pg.data();
        blocks([&](int64_t i, int64_t R, int64_t width) {
          gemm(R, width, Dv, w.A.data() + i * Dv, Dv, wb.vbT.data() + i, cols, pg + i * cols + i, cols, false);
        });
        double acc = 0.0;
        for (int64_t t = 0; t < n; ++t) {
          float* wr = wm + t * cols;
          float* dr = pg + t * cols;  // becomes dl (0 outside the row's band)
          const int64_t hi = std::min(t + band, cols);
          const float a_e = ae[t], bt = beta[t];
          float* cs = wb.colsum.data();
          float rs = 0.f;
          std::fill(dr, dr + t, 0.f);
#pragma omp simd reduction(+ : rs)
          for (int64_t e = t; e < hi; ++e) {
            wr[e] *= a_e;
            dr[e] = wr[e] * (dr[e] + bt);
            rs += dr[e];
            cs[e] += dr[e];
          }
          std::fill(dr + hi, dr + cols, 0.f);
          rsum[t] = rs;
          acc += rs;
        }
        mix_acc += acc;
        transpose(pg, n, cols, wb.dlT.data());
        transpose(wm, n, cols, wb.wmT.data());
        blocks([&](int64_t i, int64_t R, int64_t width) {
          gemm(R, D, width, pg + i * cols + i, cols, wb.y.data() + i * D, D, dx + i * D, D, false);
          gemm(width, D, R, wb.dlT.data() + i * n + i, n, x + i * D, D, wb.dyb.data() + i * D, D, true);
          gemm(width, Dv, R, wb.wmT.data() + i * n + i, n, w.A.data() + i * Dv, Dv, wb.dvb.data() + i * Dv, Dv,
               true);
        });
      }
      for (int64_t t = 0; t < n; ++t) {
        const float* xr = x + t * D;
        float* dxr = dx + t * D;
        const float* A = w.A.data() + t * Dv;
        const float* slr = wb.sl.data() + t * NS;
        if (le[t] != BNEG_INF) {
          for (int64_t s = 0; s < NS; ++s) {
            if (sk.from[s] > (causal ? lo + t : T - 1)) continue;
            const float ws = slr[s] * ae[t];
            const float* vs = sk.v + s * Dv;
            const float dl = ws * (dot(A, vs, Dv) + beta[t]);
            mix_acc += dl;
            rsum[t] += dl;
            const float* ys = wb.sy.data() + s * D;
            float* dys = wb.dsy.data() + s * D;
            for (int64_t d = 0; d < D; ++d) {
              dxr[d] += dl * ys[d];
              dys[d] += dl * (xr[d] + 2.f * exact_sq * ys[d]);
            }
            float* dvs = wb.dsv.data() + s * Dv;
            for (int64_t d = 0; d < Dv; ++d) dvs[d] += ws * A[d];
          }
        }
        float* dq = dqg + t * X.sq;
        const float k2 = 2.f * exact_sq * rsum[t];
        for (int64_t d = 0; d < D; ++d) dq[d] += c.root * (dxr[d] + k2 * xr[d]);
      }
    }
    // the band's key gradients
    if (band > 0) {
      for (int64_t e = 0; e < cols; ++e) {
        float* dk = ext.dk_row(lo + e);
        float* dv = ext.dv_row(lo + e);
        const float* yr = wb.y.data() + e * D;
        const float k2 = 2.f * exact_sq * wb.colsum[e];
        for (int64_t d = 0; d < D; ++d) dk[d] += c.root * (wb.dyb[e * D + d] + k2 * yr[d]);
        for (int64_t d = 0; d < Dv; ++d) dv[d] += wb.dvb[e * Dv + d];
      }
    }
    if (!causal) {
      // the chunk's keys (rows [0, n)) leave the region: their gradients are complete; then they join P
      finish_keys(lo, 0, n, DPs.data() + ci * FS);
      gemm(F, Dv, n, wb.pkbT.data(), cols, wb.vb.data(), Dv, Pn.data(), Dv, true);
      for (int64_t f = 0; f < F; ++f) zP[f] += row_sum(wb.pkbT.data() + f * cols, n);
      if (ci == nch - 1) {
        finish_keys(lo, n, cols, DPs.data() + ci * FS);  // the final tail's keys (no later chunk)
      } else {
        have = cols - n;  // the rows [n, cols) open the next chunk's region
        std::memmove(wb.pkb.data(), wb.pkb.data() + n * F, sizeof(float) * have * F);
        std::memmove(wb.dpkb.data(), wb.dpkb.data() + n * F, sizeof(float) * have * F);
        std::memmove(wb.dvfb.data(), wb.dvfb.data() + n * Dv, sizeof(float) * have * Dv);
      }
      continue;
    }
    // the chunk's feature keys join the state
    gemm(F, Dv, n, w.pkt.data(), n, w.vb.data(), Dv, S, Dv, true);
    for (int64_t t = 0; t < n; ++t) {
      const float* pr = pk + t * F;
      for (int64_t f = 0; f < F; ++f) z[f] += pr[f];
    }
    kept_folded += wb.kept_before[n];
  }

  if (!causal) {
    // the initial state: read by every chunk's queries (on ks_all) and carried into the final state (on m_fin;
    // T = 0: the final state is the initial one)
    const float a_q = nch == 0 || std::isinf(m0) ? 0.f : std::exp(m0 - ks_all);
    const float a_f = nch == 0 ? 1.f : (std::isinf(m0) ? 0.f : std::exp(m0 - m_fin));
    for (int64_t f = 0; f < F; ++f) {
      for (int64_t d = 0; d < Dv; ++d)
        dS0[f * Dv + d] = a_q * w.dST[d * F + f] + (dSfin ? a_f * dSfin[f * Dv + d] : 0.f);
      dz0[f] = a_q * w.dz[f] + (dzfin ? a_f * dzfin[f] : 0.f);
    }
  } else {

  // ---- backward walk: dS, dz from the final state to the first chunk; the feature keys' dk, dv
  float* dST = w.dST.data();
  float* dz = w.dz.data();
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
  for (int64_t ci = nch - 1; ci >= 0; --ci) {
    const int64_t lo = ci * BCHUNK, n = std::min(BCHUNK, T - lo);
    ext.stage(lo, n, wb.kb.data(), wb.vb.data(), kp);
    key_logits(wb.kb.data(), D, reinterpret_cast<const bool*>(kp), n, c, hp, w.kr);
    key_phi_shifted(n, c, w.kr, shifts[ci]);
    load_v(wb.vb.data(), Dv, n, Dv, w);
    // the state terms: dv = pk dS, dpk = v dS^T + dz
    transpose(dST, Dv, F, w.dS.data());
    gemm(n, Dv, F, pk, F, w.dS.data(), Dv, w.dvb.data(), Dv, false);
    gemm(n, F, Dv, w.vb.data(), Dv, dST, F, w.dpk.data(), F, false);
    for (int64_t t = 0; t < n; ++t) {
      float* r = w.dpk.data() + t * F;
      for (int64_t f = 0; f < F; ++f) r[f] += dz[f];
    }
    for (int64_t g = 0; g < G; ++g) {
      query_phi_shift(qp + g * D + lo * X.sq, X.sq, n, c, hp, w.qr, wb.qs.data());
      transpose(pq, n, F, w.pqT.data());
      const float* go = gp + g * Dv + lo * X.so;
      for (int64_t t = 0; t < n; ++t) {
        const float f0 = fa[g * T + lo + t];
        for (int64_t d = 0; d < Dv; ++d) w.A[t * Dv + d] = go[t * X.so + d] * f0;
        w.beta[t] = fb[g * T + lo + t];
      }
      // scT[j, t] = pk_j . pq_t for the queries that see key j (t >= j + 1 - diag): dv += scT A
      float* sc = w.sc.data();
      gemm(n, n, F, pk, F, w.pqT.data(), n, sc, n, false);
      for (int64_t j = 0; j < n; ++j) std::fill(sc + j * n, sc + j * n + std::min(n, j + 1 - diag), 0.f);
      gemm(n, Dv, n, sc, n, w.A.data(), Dv, w.dvb.data(), Dv, true);
      // PT[j, t] = v_j . a_t + beta_t for those t: dpk += PT pq
      transpose(w.A.data(), n, Dv, w.AT.data());
      float* P = w.P.data();
      gemm(n, n, Dv, w.vb.data(), Dv, w.AT.data(), n, P, n, false);
      for (int64_t j = 0; j < n; ++j) {
        float* row = P + j * n;
        const int64_t from = std::min(n, j + 1 - diag);
        std::fill(row, row + from, 0.f);
        for (int64_t t = from; t < n; ++t) row[t] += w.beta[t];
      }
      gemm(n, F, n, P, n, pq, F, w.dpk.data(), F, true);
      // the chunk's queries read the state before its keys: they join dS, dz
      gemm(Dv, F, n, w.AT.data(), n, pq, F, dST, F, true);
      for (int64_t t = 0; t < n; ++t) {
        const float bt = w.beta[t];
        const float* pr = pq + t * F;
        for (int64_t f = 0; f < F; ++f) dz[f] += bt * pr[f];
      }
    }
    float* dtmp = wb.dtmp.data();
    chain(w.kr, w.dpk.data(), n, c, hp, false, w, dtmp, D, dW, dbias);
    for (int64_t t = 0; t < n; ++t) {
      float* dk = ext.dk_row(lo + t);
      float* dv = ext.dv_row(lo + t);
      for (int64_t d = 0; d < D; ++d) dk[d] += dtmp[t * D + d];
      for (int64_t d = 0; d < Dv; ++d) dv[d] += w.dvb[t * Dv + d];
    }
    scale_inplace(dST, F * Dv, alphas[ci]);
    scale_inplace(dz, F, alphas[ci]);
  }
  transpose(dST, Dv, F, dS0);
  std::memcpy(dz0, dz, sizeof(float) * F);
  }
  for (int64_t s = 0; s < NS; ++s) {
    for (int64_t d = 0; d < D; ++d) dsk[s * D + d] = c.root * wb.dsy[s * D + d];
    for (int64_t d = 0; d < Dv; ++d) dsv[s * Dv + d] = wb.dsv[s * Dv + d];
  }
  dmix = static_cast<float>(mix_acc);
}

}  // namespace

std::vector<at::Tensor> rf_window_backward(
    const at::Tensor& do_in, const c10::optional<at::Tensor>& dS_in, const c10::optional<at::Tensor>& dz_in,
    const c10::optional<at::Tensor>& dkt_in, const c10::optional<at::Tensor>& dvt_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& W_in, const at::Tensor& bias_in,
    const at::Tensor& freq_in, const c10::optional<at::Tensor>& psi_in, int64_t kind, double c_t, double c_o,
    double scale, double exact_sq, bool causal, int64_t window, const c10::optional<at::Tensor>& mask_in,
    const at::Tensor& S0_in, const at::Tensor& z0_in, const at::Tensor& m0_in, const at::Tensor& kt_in,
    const at::Tensor& vt_in, const at::Tensor& tail_keep, double den_eps, const c10::optional<at::Tensor>& cu_in,
    const c10::optional<at::Tensor>& sink_k, const c10::optional<at::Tensor>& sink_v,
    const c10::optional<at::Tensor>& sink_from, const c10::optional<at::Tensor>& sink_skip,
    const c10::optional<at::Tensor>& log_mix, const c10::optional<at::Tensor>& o_in,
    const c10::optional<at::Tensor>& stats_in, const c10::optional<at::Tensor>& kshift_in) {
  auto given = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  TORCH_CHECK_VALUE(kind == KIND_EXP || kind == KIND_HYP || kind == KIND_TRIG || kind == KIND_NORM_HYP,
                    "unknown feature kind ", kind);
  TORCH_CHECK_VALUE(window >= 0, "window must be >= 0");
  const auto fdt = at::kFloat;
  auto f32 = [&](const at::Tensor& t) { return t.to(fdt).contiguous(); };
  const at::Tensor q = f32(q_in), k = f32(k_in), v = f32(v_in), go = f32(do_in);
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3), Dv = v.size(3), H = k.size(2);
  TORCH_CHECK_VALUE(H > 0 && Hq % H == 0 && go.sizes() == at::IntArrayRef({B, T, Hq, Dv}),
                    "the output gradient must be [B, T, H, Dv]");
  const int64_t G = Hq / H, m = W_in.size(1), F = kind == KIND_EXP ? m : 2 * m;
  const int64_t nt = std::max<int64_t>(window - 1, 0);
  std::vector<BSpan> spans;
  if (given(cu_in)) {
    const at::Tensor cu = cu_in->to(at::kLong).contiguous();
    const int64_t* cp = cu.data_ptr<int64_t>();
    const int64_t N = cu.size(0) - 1;
    TORCH_CHECK_VALUE(B == 1 && N >= 1 && cp[0] == 0 && cp[N] == T, "cu_seqlens must match the packed inputs");
    for (int64_t n = 0; n < N; ++n) spans.push_back({0, cp[n], cp[n + 1] - cp[n]});
  } else {
    for (int64_t b = 0; b < B; ++b) spans.push_back({b, 0, T});
  }
  const int64_t R = static_cast<int64_t>(spans.size());
  auto rows = [&](const at::Tensor& t, at::IntArrayRef shape) { return t.to(fdt).expand(shape).contiguous(); };
  const at::Tensor W = f32(W_in), WT = W.transpose(1, 2).contiguous();
  const at::Tensor bias = rows(bias_in, {R, H, m}), freq = rows(freq_in, {R, H});
  at::Tensor psi;
  if (given(psi_in)) psi = rows(*psi_in, {R, H, D});
  at::Tensor mask;
  if (given(mask_in)) mask = mask_in->to(at::kBool).contiguous();
  const at::Tensor S0 = f32(S0_in), z0 = f32(z0_in), m0 = f32(m0_in), kt = f32(kt_in), vt = f32(vt_in);
  const at::Tensor tk = tail_keep.to(at::kBool).contiguous();
  TORCH_CHECK_VALUE(S0.sizes() == at::IntArrayRef({R, H, F, Dv}) && kt.sizes() == at::IntArrayRef({R, H, nt, D}) &&
                        vt.sizes() == at::IntArrayRef({R, H, nt, Dv}) && tk.sizes() == at::IntArrayRef({R, nt}),
                    "window_backward: state shapes do not match the inputs");
  at::Tensor dSf, dzf, dktf, dvtf;
  if (given(dS_in)) dSf = f32(*dS_in);
  if (given(dz_in)) dzf = f32(*dz_in);
  if (given(dkt_in)) dktf = f32(*dkt_in);
  if (given(dvt_in)) dvtf = f32(*dvt_in);
  const bool has_sinks = given(sink_k);
  const int64_t NS = has_sinks ? sink_k->size(2) : 0;
  at::Tensor skt, svt, sft, sst;
  if (has_sinks) {
    skt = f32(*sink_k);
    svt = f32(*sink_v);
    sft = sink_from->to(at::kLong).contiguous();
    sst = sink_skip->to(at::kLong).contiguous();
  }
  at::Tensor mixt;
  if (given(log_mix)) mixt = f32(*log_mix);
  at::Tensor ot, stt, kst;  // the forward's output and per-row (top, den); non-causal, its key shift
  if (given(o_in) && given(stats_in)) {
    ot = f32(*o_in);
    stt = f32(*stats_in);
    TORCH_CHECK_VALUE(ot.sizes() == go.sizes() && stt.sizes() == at::IntArrayRef({B, T, Hq, 2}),
                      "window_backward: o and stats must be [B, T, H, Dv] and [B, T, H, 2]");
  }
  if (!causal) {
    TORCH_CHECK_VALUE(ot.defined() && given(kshift_in),
                      "window_backward: the non-causal backward needs the forward's o, stats and key_shift");
    kst = f32(*kshift_in);
    TORCH_CHECK_VALUE(kst.sizes() == at::IntArrayRef({R, H}), "window_backward: key_shift must be [R, H_kv]");
  }

  auto opts = q.options().dtype(fdt);
  at::Tensor dq = at::zeros({B, T, Hq, D}, opts), dk = at::zeros({B, T, H, D}, opts),
             dv = at::zeros({B, T, H, Dv}, opts);
  at::Tensor dWpart = at::zeros({R, H, m, D}, opts), dbias = at::zeros({R, H, m}, opts);
  at::Tensor dS0 = at::zeros({R, H, F, Dv}, opts), dz0 = at::zeros({R, H, F}, opts);
  at::Tensor dkt0 = at::zeros({R, H, nt, D}, opts), dvt0 = at::zeros({R, H, nt, Dv}, opts);
  at::Tensor dsk = at::zeros({R, H, NS, D}, opts), dsv = at::zeros({R, H, NS, Dv}, opts);
  at::Tensor dmix = at::zeros({R, H}, opts);
  BwdConfig c{static_cast<int>(kind), static_cast<float>(c_t), static_cast<float>(c_o),
              static_cast<float>(std::sqrt(scale)), D, Dv, m, F, static_cast<float>(den_eps)};
  c.norm_queries = true;  // as the window's forward: the exact part shares the query rows' normaliser
  Tensors X{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), go.data_ptr<float>(),
            dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
            Hq * D, H * D, H * Dv, Hq * Dv, T * Hq * D, T * H * D, T * H * Dv, T * Hq * Dv};
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  const float *psip = ptr(psi), *Wp = W.data_ptr<float>(), *WTp = WT.data_ptr<float>(),
              *biasp = bias.data_ptr<float>(), *freqp = freq.data_ptr<float>();
  const bool* maskp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const bool* tkp = tk.data_ptr<bool>();
  const float *S0p = S0.data_ptr<float>(), *z0p = z0.data_ptr<float>(), *m0p = m0.data_ptr<float>(),
              *ktp = kt.data_ptr<float>(), *vtp = vt.data_ptr<float>();
  const float *dSfp = ptr(dSf), *dzfp = ptr(dzf), *dktfp = ptr(dktf), *dvtfp = ptr(dvtf);
  const float *skp = ptr(skt), *svp = ptr(svt), *mixp = ptr(mixt);
  const int64_t* sfp = has_sinks ? sft.data_ptr<int64_t>() : nullptr;
  const int64_t* ssp = has_sinks ? sst.data_ptr<int64_t>() : nullptr;
  float *dWp = dWpart.data_ptr<float>(), *dbp = dbias.data_ptr<float>(), *dS0p = dS0.data_ptr<float>(),
        *dz0p = dz0.data_ptr<float>(), *dkt0p = dkt0.data_ptr<float>(), *dvt0p = dvt0.data_ptr<float>(),
        *dskp = dsk.data_ptr<float>(), *dsvp = dsv.data_ptr<float>(), *dmixp = dmix.data_ptr<float>();

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
      // (non-causal: the band region's keys go through it in blocks of up to BCHUNK rows)
      BwdWorkspace w(c, std::max<int64_t>(std::min(longest + 2 * nt, BCHUNK), 1));
      WinBwdBuffers wb;
      for (int64_t j = next++; j < n; j = next++) {
        const int64_t i = order[j], r = i / H, h = i % H;
        const BSpan& span = spans[r];
        BwdHead hp{Wp + h * m * D, WTp + h * D * m, biasp + i * m, freqp[i], psip ? psip + i * D : nullptr};
        const int64_t tok = span.b * T + span.start;  // the sequence's first token row
        WinExt ext{ktp + i * nt * D,
                   vtp + i * nt * Dv,
                   tkp + r * nt,
                   X.k + tok * H * D + h * D,
                   X.v + tok * H * Dv + h * Dv,
                   H * D,
                   H * Dv,
                   maskp ? maskp + tok : nullptr,
                   ssp ? ssp[r] : 0,
                   nt,
                   D,
                   Dv,
                   dkt0p + i * nt * D,
                   dvt0p + i * nt * Dv,
                   X.dk + tok * H * D + h * D,
                   X.dv + tok * H * Dv + h * Dv};
        WinSinks sk;
        if (has_sinks) {
          sk.k = skp + i * NS * D;
          sk.v = svp + i * NS * Dv;
          sk.from = sfp + r * NS;
          sk.S = NS;
        }
        sk.log_mix = mixp ? mixp[h] : 0.f;
        window_backward_group(X, ext, span, h, G, c, hp, w, wb, causal, window, static_cast<float>(exact_sq), sk,
                               S0p + i * F * Dv, z0p + i * F, m0p[i], dSfp ? dSfp + i * F * Dv : nullptr,
                               dzfp ? dzfp + i * F : nullptr, dktfp ? dktfp + i * nt * D : nullptr,
                               dvtfp ? dvtfp + i * nt * Dv : nullptr, dWp + i * m * D, dbp + i * m,
                               dS0p + i * F * Dv, dz0p + i * F, dskp + i * NS * D, dsvp + i * NS * Dv, dmixp[i],
                               ptr(ot), ptr(stt), kst.defined() ? kst.data_ptr<float>()[i] : BNEG_INF);
      }
    });
  }
  at::Tensor dW = at::zeros({H, m, D}, opts);
  float* dWo = dW.data_ptr<float>();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t r = 0; r < R; ++r) {
      const float* src = dWp + (r * H + h) * m * D;
      float* dst = dWo + h * m * D;
      for (int64_t e = 0; e < m * D; ++e) dst[e] += src[e];
    }
  return {dq, dk, dv, dW, dbias, dS0, dz0, dkt0, dvt0, dsk, dsv, dmix};
}
