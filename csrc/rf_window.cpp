// Hybrid attention on the CPU (DESIGN.md section 6): exact kernel weights for the keys inside a window of W
// positions, random features for every other visible key, one shared normaliser.
//
// Included by rf_attention.cpp (one translation unit: it reuses that file's feature helpers, workspace and
// task scheduler), bound as `window_forward`. Per (sequence, key/value head) task, with the G query heads
// of its group:
//   * the initial WindowState's tail (W - 1 raw keys and values, oldest first) is a prefix of the
//     sequence: "extended" key e = 0 .. W - 2 is tail row e, key e >= W - 1 is input token e - (W - 1);
//     query t sits at extended position t + W - 1;
//   * causal: the exact keys of query t are the extended keys [t, t + W - 1], the feature keys the state's
//     S/z plus the extended keys [0, t): the feature state lags W keys behind. A chunk of n queries
//     [lo, lo + n) folds the extended keys [lo, lo + n) into the state after reading it (strictly lower
//     intra-chunk products) and computes the exact band over the extended keys [lo, lo + n + W - 1);
//   * non-causal: the exact keys of query t are the extended keys [t, t + 2W - 2]; the feature keys those
//     before (a prefix walk, with the initial state) and after (a suffix walk from the end) its band, on one
//     key shift, never a subtraction (see window_group);
//   * the exact logits x.y + exact_sq (|x|^2 + |y|^2) (x, y = sqrt(scale) q, k, no psi) of a query row
//     subtract their maximum over the row's kept exact keys; the feature part keeps its stabilisers (query
//     row shift qs, key log-scale ks). The two parts are put on one scale in log space: with
//     L_e = row max + log den_e and L_f = qs + ks + log |den_f|, both are multiplied by exp(shift - max(L_e,
//     L_f)) before the one division, the denominator floored at den_eps;
//   * the final state is the causal continuation's in both modes: the features of the extended keys
//     [0, T) (initial-state ones included) in S/z/log_scale, the extended keys [T, T + W - 1) in the tail.
// A decode step (T = 1, causal) is one chunk of one query: the oldest tail key is folded into S/z, the exact
// band is the tail plus the new key, and the tail shifts by one.

namespace {

// Per-thread buffers of the window: the extended keys of one chunk's band, raw and transposed.
struct WindowBuffers {
  std::vector<float> kr, kt, ysq, vb, sc, xq, xsq, num_e, den_e, pk, pkt, num_b, den_b, S, z;
  // non-causal: the suffix states Q_j [blocks + 1, F * Dv + F], each block's shift (then its factor onto the
  // key shift), the prefix P, zp, the read R, zr; every extended key's features (block j: [F, CHUNK] at
  // j F CHUNK, on the block's shift) and each block's state B_j [blocks, F * Dv + F]
  std::vector<float> snap, snap_shift, P, zp, R, zr;
  std::vector<float> featsT, blk;
  std::vector<float> sy, sysq, sl;  // the sinks: sqrt(scale) k [S, D], exact_sq |y|^2, one row's logits
  std::vector<char> keep;
  std::vector<int64_t> kept_before;  // kept keys among the band's first r rows
  int64_t ld = 0;                    // leading dimension of kt, pkt and sc: whole vectors past the band
  void ensure(const Config& c, int64_t cols, int64_t rows) {
    ld = (cols + VW - 1) / VW * VW + VW;
    cols = ld;
    kr.resize(cols * c.D);
    kt.resize(c.D * cols);
    ysq.resize(cols);
    vb.resize(cols * c.Dv);
    sc.resize(rows * cols);
    xq.resize(rows * c.D);
    xsq.resize(rows);
    num_e.resize(rows * c.Dv);
    den_e.resize(rows);
    pk.resize(cols * c.F);
    pkt.resize(c.F * cols);
    num_b.resize(rows * c.Dv);
    den_b.resize(rows);
    S.resize(c.F * c.Dv);
    z.resize(c.F);
    R.resize(c.F * c.Dv);
    zr.resize(c.F);
    keep.resize(cols);
    kept_before.resize(cols + 1);
  }
};

// Prefetches the n rows of a strided [rows, D] input (one head of [B, T, H, D]) from `src` (stride in elements):
// issued a chunk ahead, they arrive while the current chunk computes.
template <typename T_>
inline void prefetch_rows(const T_* src, int64_t stride, int64_t n, int64_t D, bool write = false) {
  const int64_t bytes = D * static_cast<int64_t>(sizeof(T_));
  for (int64_t r = 0; r < n; ++r) {
    const char* p = reinterpret_cast<const char*>(src + r * stride);
    for (int64_t b = 0; b < bytes; b += 64) {
      if (write)
        __builtin_prefetch(p + b, 1);
      else
        __builtin_prefetch(p + b);
    }
  }
}

// Where the extended keys of one task come from: the initial tail (fp32) and the input rows.
template <typename scalar_t, typename vscalar_t>
struct ExtKeys {
  const float* k_tail;  // [W - 1, D] raw keys, or nullptr when W = 1
  const float* v_tail;  // [W - 1, Dv]
  const bool* tail_keep;  // [W - 1]
  const scalar_t* k;   // input row 0 of this sequence and head
  const vscalar_t* v;
  int64_t sk, sv;
  const bool* keep;    // the padding mask of this sequence, or nullptr
  int64_t nt;          // max(W - 1, 0)
  int64_t D, Dv;
  int64_t skip;        // tokens [0, skip) are sinks: never in the band, the tail or the features

  // Prefetches the input rows of the extended keys [e0, e0 + n) (those past the tail and before the end).
  void prefetch(int64_t e0, int64_t n, int64_t L) const {
    const int64_t a = std::max(e0, nt), b = std::min(e0 + n, L);
    if (b <= a) return;
    prefetch_rows(k + (a - nt) * sk, sk, b - a, D);
    prefetch_rows(v + (a - nt) * sv, sv, b - a, Dv);
  }

  // Raw keys, values and keep flags of the extended keys [e0, e0 + n) into kr [n, D], vb [n, Dv], kp [n].
  void stage(int64_t e0, int64_t n, float* kr, float* vb, char* kp) const {
    for (int64_t r = 0; r < n; ++r) {
      const int64_t e = e0 + r;
      float* kd = kr + r * D;
      float* vd = vb + r * Dv;
      if (e < nt) {
        std::memcpy(kd, k_tail + e * D, sizeof(float) * D);
        std::memcpy(vd, v_tail + e * Dv, sizeof(float) * Dv);
        kp[r] = tail_keep[e];
      } else {
        const int64_t j = e - nt;
        const scalar_t* ks = k + j * sk;
        const vscalar_t* vs = v + j * sv;
        for (int64_t d = 0; d < D; ++d) kd[d] = static_cast<float>(ks[d]);
        for (int64_t d = 0; d < Dv; ++d) vd[d] = static_cast<float>(vs[d]);
        kp[r] = (keep ? keep[j] : true) && j >= skip;
      }
    }
  }
};

// Rows [i, i + R) of a banded product: row r reads the columns [r, min(r + band, cols)). Computes
// sc[r, c] = A[r] . BT[:, c] over the block's column range [i, i + R - 1 + band) (clipped; rounded up to
// whole vectors, which BT's and sc's leading dimension ldb >= round_up(cols, VW) + VW leaves room for), lets
// `row(r, lo, hi)` turn row r's band into weights (zeroing what it excludes), zeroes the rest of the
// block's range, then num[r] = sum_c sc[r, c] v[c] (a GEMM over that range).
template <typename RowFn>
void banded(int64_t n, int64_t cols, int64_t band, int64_t K, const float* A, int64_t lda, const float* BT,
            int64_t ldb, float* sc, int64_t ldc, const float* vb, int64_t Dv, float* num, const RowFn& row) {
  for (int64_t i = 0; i < n; i += RB) {
    const int64_t R = std::min<int64_t>(RB, n - i);
    const int64_t width = std::min(cols - i, R - 1 + band);
    if (width <= 0) {
      std::fill(num + i * Dv, num + (i + R) * Dv, 0.f);
      for (int64_t r = i; r < i + R; ++r) row(r, r, r);
      continue;
    }
    const int64_t wide = std::min((width + VW - 1) / VW * VW, ldb - i);
    gemm(R, wide, K, A + i * lda, lda, BT + i, ldb, sc + i * ldc + i, ldc, false);
    for (int64_t r = i; r < i + R; ++r) {
      float* s = sc + r * ldc;
      const int64_t lo = std::min(r, cols), hi = std::min(r + band, cols);
      std::fill(s + i, s + lo, 0.f);
      row(r, lo, hi);
      std::fill(s + hi, s + i + width, 0.f);
    }
    gemm(R, Dv, width, sc + i * ldc + i, ldc, vb + i * Dv, Dv, num + i * Dv, Dv, false);
  }
}

// The exact part of n query rows against the band of the staged extended keys (rows [0, cols) of wb):
// num_e [n, Dv], den_e [n] and each row's shift, written into qe[r] (-inf: no kept exact key).
template <typename scalar_t>
void exact_part(const scalar_t* qsrc, int64_t sq, int64_t n, int64_t cols, int64_t band, float exact_sq,
                const Config& c, WindowBuffers& wb, float* qe) {
  const int64_t D = c.D;
  for (int64_t t = 0; t < n; ++t) {
    float* xr = wb.xq.data() + t * D;
    for (int64_t d = 0; d < D; ++d) xr[d] = static_cast<float>(qsrc[t * sq + d]) * c.root;
    wb.xsq[t] = exact_sq != 0.f ? exact_sq * dot(xr, xr, D) : 0.f;
  }
  if (band <= 0) {  // sinks only: no band
    std::fill(wb.num_e.begin(), wb.num_e.begin() + n * c.Dv, 0.f);
    std::fill(wb.den_e.begin(), wb.den_e.begin() + n, 0.f);
    std::fill(qe, qe + n, NEG_INF);
    return;
  }
  const char* kp = wb.keep.data();
  const int64_t ld = wb.ld;
  banded(n, cols, band, D, wb.xq.data(), D, wb.kt.data(), ld, wb.sc.data(), ld, wb.vb.data(), c.Dv,
         wb.num_e.data(), [&](int64_t r, int64_t lo, int64_t hi) {
           float* s = wb.sc.data() + r * ld;
           const bool all_kept = wb.kept_before[hi] - wb.kept_before[lo] == hi - lo;
           if (exact_sq != 0.f || !all_kept) {
             const float xs = wb.xsq[r];
             for (int64_t j = lo; j < hi; ++j) s[j] = kp[j] ? s[j] + xs + wb.ysq[j] : NEG_INF;
           }
           const float mx = row_max(s + lo, hi - lo);
           qe[r] = mx;
           if (mx == NEG_INF) {
             std::fill(s + lo, s + hi, 0.f);
             wb.den_e[r] = 0.f;
             return;
           }
           exp_shifted(s + lo, hi - lo, mx);
           wb.den_e[r] = row_sum(s + lo, hi - lo);
         });
}

// The attention sinks of one task (DESIGN.md section 8): S raw-key slots, scaled into WindowBuffers::sy.
struct Sinks {
  const float* k = nullptr;        // [S, D] raw keys (fp32), or nullptr without sinks
  const float* v = nullptr;        // [S, Dv]
  const int64_t* from = nullptr;   // [S]: the first query that sees the slot (-1: all; >= T: none)
  int64_t S = 0;
  float log_mix = 0.f;             // the learned factor's log, added to every exact logit
};

// Merges the visible sinks into the exact part of n query rows (queries lo .. lo + n of the sequence;
// causal: slot s is visible to query t iff from[s] <= t, otherwise iff from[s] <= last), then adds the
// factor to each row's shift. wb.xq, wb.xsq hold the rows (exact_part), wb.sy, wb.sysq the sinks.
inline void exact_sinks(int64_t n, int64_t lo, bool causal, int64_t last, const Sinks& sk, const Config& c,
                        WindowBuffers& wb, float* qe) {
  const int64_t D = c.D, Dv = c.Dv;
  if (sk.S > 0) {
    float* l = wb.sl.data();
    for (int64_t t = 0; t < n; ++t) {
      const int64_t upto = causal ? lo + t : last;
      const float* xr = wb.xq.data() + t * D;
      float mx = NEG_INF;
      for (int64_t s = 0; s < sk.S; ++s) {
        if (sk.from[s] > upto) {
          l[s] = NEG_INF;
          continue;
        }
        l[s] = dot(xr, wb.sy.data() + s * D, D) + wb.xsq[t] + wb.sysq[s];
        mx = std::max(mx, l[s]);
      }
      if (mx == NEG_INF) continue;
      float* ne = wb.num_e.data() + t * Dv;
      const float top = std::max(mx, qe[t]);
      if (qe[t] != NEG_INF && top != qe[t]) {
        const float a = std::exp(qe[t] - top);
        for (int64_t d = 0; d < Dv; ++d) ne[d] *= a;
        wb.den_e[t] *= a;
      } else if (qe[t] == NEG_INF) {
        std::fill(ne, ne + Dv, 0.f);
        wb.den_e[t] = 0.f;
      }
      for (int64_t s = 0; s < sk.S; ++s) {
        if (l[s] == NEG_INF) continue;
        const float p = std::exp(l[s] - top);
        const float* vs = sk.v + s * Dv;
        for (int64_t d = 0; d < Dv; ++d) ne[d] += p * vs[d];
        wb.den_e[t] += p;
      }
      qe[t] = top;
    }
  }
  if (sk.log_mix != 0.f)
    for (int64_t t = 0; t < n; ++t)
      if (qe[t] != NEG_INF) qe[t] += sk.log_mix;
}

// Rows [j0, j1) of the staged extended keys as the exact part reads them: kt [D, ld] = sqrt(scale) k
// transposed, ysq = exact_sq |y|^2.
inline void exact_keys(int64_t j0, int64_t j1, float exact_sq, const Config& c, WindowBuffers& wb) {
  const int64_t D = c.D;
  for (int64_t j = j0; j < j1; ++j) {
    const float* kr = wb.kr.data() + j * D;
    float sq = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float y = kr[d] * c.root;
      wb.kt[d * wb.ld + j] = y;
      sq += y * y;
    }
    wb.ysq[j] = exact_sq * sq;
  }
}

// o = (num_e a_e + num_f a_f) / max(|den_e a_e + den_f a_f|, eps), both parts on one scale in log space
// (see the file's header). `has_f`: some visible key lies outside the window (else the feature part is 0).
template <typename oscalar_t>
void combine_row(int64_t Dv, const float* num_e, float den_e, float le, const float* num_f, float den_f,
                 float lf, bool has_f, float eps, oscalar_t* dst, float* stat = nullptr) {
  const bool has_e = le != NEG_INF && den_e > 0.f;
  has_f = has_f && std::isfinite(lf);
  if (!has_e && !has_f) {
    for (int64_t d = 0; d < Dv; ++d) dst[d] = static_cast<oscalar_t>(0.f);
    if (stat) stat[0] = NEG_INF, stat[1] = 0.f;  // no visible key: no gradient
    return;
  }
  const float ce = has_e ? le + std::log(den_e) : NEG_INF;
  const float cf = has_f ? lf + (den_f != 0.f ? std::log(std::fabs(den_f)) : 0.f) : NEG_INF;
  const float top = std::max(ce, cf);
  const float ae = has_e ? std::exp(le - top) : 0.f;
  const float af = has_f ? std::exp(lf - top) : 0.f;
  const float den = den_e * ae + den_f * af;
  const float inv = 1.f / std::max(std::fabs(den), eps);
  if (stat) stat[0] = top, stat[1] = den;  // what the backward needs of the row (rf_window_bwd.cpp)
  for (int64_t d = 0; d < Dv; ++d) {
    const float ne = has_e ? num_e[d] * ae : 0.f;
    const float nf = has_f ? num_f[d] * af : 0.f;
    dst[d] = static_cast<oscalar_t>((ne + nf) * inv);
  }
}

struct WindowTask {
  int64_t W;
  float exact_sq;
  bool causal;
  bool state_nonempty;  // the initial state's S/z holds keys (its log_scale is finite)
};

// One key/value head and the G query heads of its group over one sequence, with the window.
// S, z, m_state: the final state (initialised from the initial one); k_tail_out/v_tail_out [W - 1, .].
template <typename scalar_t, typename vscalar_t>
void window_group(const at::Tensor& q, at::Tensor& o, const ExtKeys<scalar_t, vscalar_t>& ext, const Span& span,
                  int64_t hk, int64_t G, const Config& c, const HeadParams& hp, const WindowTask& wt, Workspace& w,
                  WindowBuffers& wb, const Sinks& sk, float* S, float* z, float& m_state, float* k_tail_out,
                  float* v_tail_out, bool* tail_keep_out, float* stats, float* kshift_out = nullptr) {
  const int64_t T = span.T, b = span.b, t0 = span.start, W = wt.W, nt = std::max<int64_t>(W - 1, 0), L = T + nt;
  const int64_t F = c.F, D = c.D, Dv = c.Dv;
  const scalar_t* qp = q.data_ptr<scalar_t>() + b * q.stride(0) + t0 * q.stride(1) + hk * G * q.stride(2);
  vscalar_t* op = o.data_ptr<vscalar_t>() + b * o.stride(0) + t0 * o.stride(1) + hk * G * o.stride(2);
  const int64_t sq = q.stride(1), so = o.stride(1), sqh = q.stride(2), soh = o.stride(2);
  // per query row (top, den) of the causal combination, [B, T, H, 2] (or nullptr)
  const int64_t sst = q.size(2) * 2;
  float* stp = stats ? stats + (b * q.size(1) + t0) * sst + hk * G * 2 : nullptr;
  // the exact band's width (0: sinks only, window 0)
  const int64_t band = W == 0 ? 0 : (wt.causal ? W : 2 * W - 1);
  const int64_t rows = std::min(CHUNK, std::max<int64_t>(T, 1));
  // the staged rows: causal, a chunk and the band's W - 1 keys before it; non-causal, a region (a chunk and
  // the 2W - 2 keys after it, rounded up to a whole block of CHUNK keys)
  const int64_t up_nc = std::max<int64_t>(band - 1, 0);
  wb.ensure(c, wt.causal ? rows + std::max<int64_t>(band, 1) - 1 : (rows + up_nc + CHUNK - 1) / CHUNK * CHUNK, rows);
  std::vector<float> qe(CHUNK);
  char* kp = wb.keep.data();
  if (sk.S > 0) {  // the sinks as the exact part reads them
    wb.sy.resize(sk.S * D);
    wb.sysq.resize(sk.S);
    wb.sl.resize(sk.S);
    for (int64_t s = 0; s < sk.S; ++s) {
      float sq2 = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float y = sk.k[s * D + d] * c.root;
        wb.sy[s * D + d] = y;
        sq2 += y * y;
      }
      wb.sysq[s] = wt.exact_sq * sq2;
    }
  }
  // W = 0: the chunk's feature keys include each query's own key (no band holds it)
  const int64_t diag = W == 0 ? 1 : 0;

  if (wt.causal) {
    int64_t kept_folded = 0;  // kept extended keys already in the state
    int64_t have = 0;         // buffer rows [0, have): the extended keys [lo, lo + have), from the last chunk
    for (int64_t lo = 0; lo < T; lo += CHUNK) {
      const int64_t n = std::min(CHUNK, T - lo);
      const int64_t cols = n + nt;  // the extended keys [lo, lo + n + W - 1): n feature keys first
      ext.stage(lo + have, cols - have, wb.kr.data() + have * D, wb.vb.data() + have * Dv, kp + have);
      wb.kept_before[0] = 0;
      for (int64_t j = 0; j < cols; ++j) wb.kept_before[j + 1] = wb.kept_before[j] + (kp[j] ? 1 : 0);
      if (band > 0) exact_keys(have, cols, wt.exact_sq, c, wb);
      // the feature keys of the chunk: the extended keys [lo, lo + n), moving the state's maximum
      key_features(wb.kr.data(), D, reinterpret_cast<const bool*>(kp), n, c, hp, w, S, z, m_state);
      std::memcpy(w.vb.data(), wb.vb.data(), sizeof(float) * n * Dv);
      const float ks = std::isinf(m_state) ? 0.f : m_state;
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* qg = qp + g * sqh + lo * sq;
        query_features(qg, sq, n, c, hp, w);
        float* sc = w.sc.data();
        // strictly lower intra-chunk feature products: feature key r' < r for query r (W = 0: r' <= r)
        gemm(n, n, F, w.pq.data(), F, w.pkt.data(), n, sc, n, false, TRI_N);
        for (int64_t t = 0; t < n; ++t) {
          float* row = sc + t * n;
          std::fill(row + t + diag, row + n, 0.f);
          float s = 0.f;
          for (int64_t j = 0; j < t + diag; ++j) s += row[j];
          w.den[t] = s;
        }
        gemm_lower(n, Dv, sc, n, w.vb.data(), Dv, w.num.data(), Dv);
        read_state(n, c, w, S, z, true);
        exact_part(qg, sq, n, cols, band, wt.exact_sq, c, wb, qe.data());
        exact_sinks(n, lo, true, 0, sk, c, wb, qe.data());
        for (int64_t t = 0; t < n; ++t) {
          const bool has_f = wt.state_nonempty || kept_folded + wb.kept_before[t + diag] > 0;
          combine_row(Dv, wb.num_e.data() + t * Dv, wb.den_e[t], qe[t], w.num.data() + t * Dv, w.den[t],
                      w.qs[t] + ks, has_f, c.den_eps, op + g * soh + (lo + t) * so,
                      stp ? stp + g * 2 + (lo + t) * sst : nullptr);
        }
      }
      update_state(n, c, w, S, z);
      kept_folded += wb.kept_before[n];
      // the last W - 1 rows are the next chunk's first ones
      have = cols - n;
      std::memmove(wb.kr.data(), wb.kr.data() + n * D, sizeof(float) * have * D);
      std::memmove(wb.vb.data(), wb.vb.data() + n * Dv, sizeof(float) * have * Dv);
      std::memmove(kp, kp + n, have);
      std::memmove(wb.ysq.data(), wb.ysq.data() + n, sizeof(float) * have);
      for (int64_t d = 0; d < D; ++d) {
        float* row = wb.kt.data() + d * wb.ld;
        std::memmove(row, row + n, sizeof(float) * have);
      }
    }
  } else {
    // Non-causal: query t's feature keys are the extended keys before its band (the prefix, e < t, and the
    // initial state) and after it (the suffix, e >= t + band), on one key shift: the maximum over every
    // extended key and the initial state (ma), as the reference's. Chunk c of queries [lo, hi) has the
    // region [lo, E_c), E_c = hi + band - 1 rounded up to a whole block of CHUNK extended keys (or L; the
    // chunk's keys, W = 0); it reads the prefix state P_c (the keys before lo) plus the suffix state Q_c (the
    // keys from E_c on) in one product, and the region's keys outside each row's band as feature products:
    // the keys [lo, t) of a strictly lower block (W = 0: [lo, t]) and the keys (t + band - 1, E_c) of a
    // strictly upper one. No band is subtracted from a total.
    //   * a key pass computes every extended key's features once, block by block (CHUNK keys, each block on
    //     its own maximum), keeps them (transposed, [F, CHUNK] per block) and each block's state
    //     B_j = phi^T [v, 1]; it
    //     also finds ma, the maximum over the keys [0, T) (the final state's shift) and the count of kept
    //     keys. The blocks are then moved to ma (one factor per block) and summed from the end into the
    //     suffix states Q_j (F x (Dv + 1) floats per block, as B_j);
    //   * a query pass carries P (the initial state plus B_0 .. B_{c-1}, on ma) and the region's raw rows
    //     from chunk to chunk, reads P_c + Q_{E_c}, adds the two triangular blocks (the region's key
    //     features copied from their blocks, moved to ma), the exact band and the sinks.
    // Each key's projection and state product is computed once (the walks of the previous version computed
    // both twice); the kept features, block states and suffix states are about 3 F floats per extended key (Dv = 64).
    // P after the last chunk holds the extended keys [0, T) and the initial state: the final state, moved
    // to its own shift (the causal continuation's).
    const int64_t nch = (T + CHUNK - 1) / CHUNK;
    const int64_t up = std::max<int64_t>(band - 1, 0);  // the region reaches `up` keys past its chunk
    const int64_t nblk = (L + CHUNK - 1) / CHUNK;
    auto region_end = [&](int64_t lo) {
      return std::min((std::min(lo + CHUNK, T) + up + CHUNK - 1) / CHUNK * CHUNK, L);
    };
    const int64_t FS = F * Dv + F;
    wb.featsT.resize(std::max<int64_t>(nblk, 1) * F * CHUNK);  // block j: [F, CHUNK] at j F CHUNK
    wb.blk.resize(std::max<int64_t>(nblk, 1) * FS);
    wb.snap.resize((nblk + 1) * FS);
    wb.snap_shift.resize(std::max<int64_t>(nblk, 1));
    wb.P.resize(F * Dv);
    wb.zp.resize(F);
    float* fT = wb.featsT.data();
    float ma = m_state, m_fin = m_state;
    int64_t kept_total = 0;
    // the key pass: block j holds the extended keys [j CHUNK, min((j + 1) CHUNK, L))
    for (int64_t j = 0; j < nblk; ++j) {
      const int64_t e0 = j * CHUNK, nk = std::min(CHUNK, L - e0);
      ext.stage(e0, nk, wb.kr.data(), w.vb.data(), kp);
      ext.prefetch(e0 + nk, CHUNK, L);  // the next block
      for (int64_t r = 0; r < nk; ++r) kept_total += kp[r] ? 1 : 0;
      const float cmax = key_logits(wb.kr.data(), D, reinterpret_cast<const bool*>(kp), nk, c, hp, w);
      ma = std::max(ma, cmax);
      if (e0 + nk <= T) {
        m_fin = std::max(m_fin, cmax);
      } else {
        for (int64_t r = 0; r < T - e0; ++r) m_fin = std::max(m_fin, row_max(w.pk.data() + r * F, F));
      }
      const float shift = std::isinf(cmax) ? 0.f : cmax;
      wb.snap_shift[j] = cmax;
      key_exponentiate(nk, c, w, shift);
      for (int64_t f = 0; f < F; ++f) std::memcpy(fT + (j * F + f) * CHUNK, w.pkt.data() + f * nk, sizeof(float) * nk);
      float* Bj = wb.blk.data() + j * FS;
      gemm(F, Dv, nk, w.pkt.data(), nk, w.vb.data(), Dv, Bj, Dv, false);
      for (int64_t f = 0; f < F; ++f) Bj[F * Dv + f] = row_sum(w.pkt.data() + f * nk, nk);
    }
    if (kshift_out) *kshift_out = ma;
    const float ks = std::isinf(ma) ? 0.f : ma;
    // the blocks onto ma; the suffix states Q_j = sum_{i >= j} B_i (Q_nblk = 0)
    std::fill(wb.snap.begin() + nblk * FS, wb.snap.begin() + (nblk + 1) * FS, 0.f);
    for (int64_t j = nblk - 1; j >= 0; --j) {
      const float sj = std::isinf(wb.snap_shift[j]) ? 0.f : std::exp(wb.snap_shift[j] - ks);
      const float* Bj = wb.blk.data() + j * FS;
      wb.snap_shift[j] = sj;  // from here on: the block's factor onto ma (applied to its features and B_j when read)
      const float* Qn = wb.snap.data() + (j + 1) * FS;
      float* Qj = wb.snap.data() + j * FS;
#pragma omp simd
      for (int64_t i = 0; i < FS; ++i) Qj[i] = Qn[i] + sj * Bj[i];
    }
    float* P = wb.P.data();
    float* zp = wb.zp.data();
    const float a0 = std::isinf(m_state) ? 0.f : std::exp(m_state - ks);
    for (int64_t i = 0; i < F * Dv; ++i) P[i] = S[i] * a0;
    for (int64_t f = 0; f < F; ++f) zp[f] = z[f] * a0;
    float* Rs = wb.R.data();
    float* zr = wb.zr.data();
    const int64_t diag_l = band > 0 ? 0 : 1;  // the lower block holds the diagonal when there is no band
    int64_t have = 0;  // staged rows [0, have): the previous chunk's region's overlap with this one
    for (int64_t ci = 0; ci < nch; ++ci) {
      const int64_t lo = ci * CHUNK, n = std::min(CHUNK, T - lo);
      const int64_t cols = region_end(lo) - lo;  // the extended keys [lo, lo + cols)
      ext.stage(lo + have, cols - have, wb.kr.data() + have * D, wb.vb.data() + have * Dv, kp + have);
      if (lo + CHUNK < T) {  // the next chunk's new region rows, query rows and output rows
        ext.prefetch(lo + cols, CHUNK, L);
        const int64_t n2 = std::min(CHUNK, T - lo - CHUNK);
        for (int64_t g = 0; g < G; ++g) {
          prefetch_rows(qp + g * sqh + (lo + CHUNK) * sq, sq, n2, D);
          prefetch_rows(op + g * soh + (lo + CHUNK) * so, so, n2, Dv, true);
        }
      }
      wb.kept_before[0] = 0;
      for (int64_t j = 0; j < cols; ++j) wb.kept_before[j + 1] = wb.kept_before[j] + (kp[j] ? 1 : 0);
      if (band > 0) exact_keys(have, cols, wt.exact_sq, c, wb);
      // the region's key features [F, cols] (leading dimension wb.ld), copied from their blocks
      float* pkt = wb.pkt.data();
      const int64_t Lp = wb.ld;
      for (int64_t e = lo; e < lo + cols; e += CHUNK) {
        const int64_t nk = std::min(CHUNK, lo + cols - e);
        const float* src = fT + (e / CHUNK) * F * CHUNK;
        const float sj = wb.snap_shift[e / CHUNK];
        for (int64_t f = 0; f < F; ++f) {
          float* dst = pkt + f * Lp + (e - lo);
          const float* sr = src + f * CHUNK;
#pragma omp simd
          for (int64_t i = 0; i < nk; ++i) dst[i] = sr[i] * sj;
        }
      }
      // the state the chunk's queries read: the prefix and the suffix from the region's end
      const float* Qc = wb.snap.data() + ((lo + cols + CHUNK - 1) / CHUNK) * FS;
#pragma omp simd
      for (int64_t i = 0; i < F * Dv; ++i) Rs[i] = P[i] + Qc[i];
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) zr[f] = zp[f] + Qc[F * Dv + f];
      const int64_t nu = cols - up;  // the upper block's columns [up, up + nu)
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* qg = qp + g * sqh + lo * sq;
        query_features(qg, sq, n, c, hp, w);
        read_state(n, c, w, Rs, zr, false);
        const float* pq = w.pq.data();
        // the lower block: region key r' < r (W = 0: r' <= r)
        float* sc = w.sc.data();
        gemm(n, n, F, pq, F, pkt, Lp, sc, n, false, TRI_N);
        for (int64_t t = 0; t < n; ++t) {
          float* row = sc + t * n;
          std::fill(row + t + diag_l, row + n, 0.f);
          w.den[t] += row_sum(row, t + diag_l);
        }
        gemm(n, Dv, n, sc, n, wb.vb.data(), Dv, w.num.data(), Dv, true, TRI_K);
        // the upper block: region key up + r' with r' > r, in row blocks over the columns they need
        float* su = wb.sc.data();
        const int64_t ldu = wb.ld;
        for (int64_t i = 0; i < n && nu > 0; i += RB) {
          const int64_t R = std::min<int64_t>(RB, n - i);
          if (std::min(i + 1, nu) >= nu) break;
          const int64_t c0 = (i + 1) / VW * VW;  // (from a whole vector: no scalar tail when nu is one)
          // (whole vectors: the columns past nu, within both buffers' leading dimension, are computed and unread)
          const int64_t wide = std::min((nu - c0 + VW - 1) / VW * VW, std::min(ldu, Lp - up) - c0);
          gemm(R, wide, F, pq + i * F, F, pkt + up + c0, Lp, su + i * ldu + c0, ldu, false);
          for (int64_t r = i; r < i + R; ++r) {
            float* row = su + r * ldu;
            const int64_t from = std::min(r + 1, nu);
            std::fill(row + c0, row + from, 0.f);
            w.den[r] += row_sum(row + from, nu - from);
          }
          gemm(R, Dv, nu - c0, su + i * ldu + c0, ldu, wb.vb.data() + (up + c0) * Dv, Dv, w.num.data() + i * Dv, Dv,
               true);
        }
        exact_part(qg, sq, n, cols, band, wt.exact_sq, c, wb, qe.data());
        exact_sinks(n, lo, false, T - 1, sk, c, wb, qe.data());
        for (int64_t t = 0; t < n; ++t) {
          const int64_t hi = std::min(t + band, cols);
          const int64_t outside = band > 0 ? kept_total - (wb.kept_before[hi] - wb.kept_before[t]) : kept_total;
          combine_row(Dv, wb.num_e.data() + t * Dv, wb.den_e[t], qe[t], w.num.data() + t * Dv, w.den[t],
                      w.qs[t] + ks, wt.state_nonempty || outside > 0, c.den_eps, op + g * soh + (lo + t) * so,
                      stp ? stp + g * 2 + (lo + t) * sst : nullptr);
        }
      }
      // the chunk's keys join the prefix: a whole block, or (the last chunk) the keys [lo, T)
      if (n == CHUNK) {
        const float* Bc = wb.blk.data() + ci * FS;
        const float sc_ = wb.snap_shift[ci];
#pragma omp simd
        for (int64_t i = 0; i < F * Dv; ++i) P[i] += sc_ * Bc[i];
#pragma omp simd
        for (int64_t f = 0; f < F; ++f) zp[f] += sc_ * Bc[F * Dv + f];
      } else {
        gemm(F, Dv, n, pkt, Lp, wb.vb.data(), Dv, P, Dv, true);
        for (int64_t f = 0; f < F; ++f) zp[f] += row_sum(pkt + f * Lp, n);
      }
      // the rows [n, cols) open the next chunk's region
      have = lo + n < T ? std::max<int64_t>(cols - n, 0) : 0;
      if (have > 0) {
        std::memmove(wb.kr.data(), wb.kr.data() + n * D, sizeof(float) * have * D);
        std::memmove(wb.vb.data(), wb.vb.data() + n * Dv, sizeof(float) * have * Dv);
        std::memmove(kp, kp + n, have);
        std::memmove(wb.ysq.data(), wb.ysq.data() + n, sizeof(float) * have);
        for (int64_t d = 0; d < D; ++d) {
          float* row = wb.kt.data() + d * wb.ld;
          std::memmove(row, row + n, sizeof(float) * have);
        }
      }
    }
    // the final state: P (the extended keys [0, T) and the initial state) on the causal continuation's
    // shift m_fin; when ma is far above it (the last W - 1 keys' exponents dwarf the others) P's features
    // would have underflowed: those keys are folded again on the running maximum instead
    if (T > 0) {
      if (std::isinf(m_fin)) {
        std::fill(S, S + F * Dv, 0.f);
        std::fill(z, z + F, 0.f);
        m_state = NEG_INF;
      } else if (ks - m_fin <= 30.f) {
        const float gm = std::exp(ks - m_fin);
        for (int64_t i = 0; i < F * Dv; ++i) S[i] = P[i] * gm;
        for (int64_t f = 0; f < F; ++f) z[f] = zp[f] * gm;
        m_state = m_fin;
      } else {
        for (int64_t lo = 0; lo < T; lo += CHUNK) {
          const int64_t nk = std::min(CHUNK, T - lo);
          ext.stage(lo, nk, wb.kr.data(), w.vb.data(), kp);
          key_features(wb.kr.data(), D, reinterpret_cast<const bool*>(kp), nk, c, hp, w, S, z, m_state);
          update_state(nk, c, w, S, z);
        }
      }
    }
  }
  // the final tail: the extended keys [T, T + W - 1)
  if (nt > 0) {
    std::vector<char> tk(nt);
    ext.stage(T, nt, k_tail_out, v_tail_out, tk.data());
    if (tail_keep_out)
      for (int64_t r = 0; r < nt; ++r) tail_keep_out[r] = tk[r] != 0;
  }
}

std::vector<at::Tensor> rf_window_forward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& WT,
    const at::Tensor& bias, const at::Tensor& freq, const c10::optional<at::Tensor>& psi, int64_t kind, double c_t,
    double c_o, double scale, double exact_sq, bool causal, int64_t window, const c10::optional<at::Tensor>& mask_in,
    const at::Tensor& S0, const at::Tensor& z0, const at::Tensor& m0, const at::Tensor& k_tail,
    const at::Tensor& v_tail, const at::Tensor& tail_keep, double den_eps, const c10::optional<at::Tensor>& cu,
    const c10::optional<at::Tensor>& sink_k, const c10::optional<at::Tensor>& sink_v,
    const c10::optional<at::Tensor>& sink_from, const c10::optional<at::Tensor>& sink_skip,
    const c10::optional<at::Tensor>& log_mix, bool need_stats) {
  // ops/cpu_window.py prepares the arguments: fp32 contiguous parameters with one row per sequence
  // ([R, H, ...]), a whole fp32 initial state (the empty one when none), int64 offsets [R + 1]; with sinks
  // the slots of this call (fp32 sink_k [R, H, S, D], sink_v [R, H, S, Dv]), int64 sink_from [R, S] (the first
  // token of the sequence that sees the slot: -1 all, >= its length none) and sink_skip [R] (its first
  // tokens that are sinks); log_mix: the learned factor's log, fp32 [H] (or none).
  TORCH_CHECK_VALUE(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "q, k, v must be [B, T, H, D]");
  TORCH_CHECK_VALUE(window >= 0, "window must be >= 0, got ", window);
  TORCH_CHECK_VALUE(kind == KIND_EXP || kind == KIND_HYP || kind == KIND_TRIG || kind == KIND_NORM_HYP,
                    "unknown feature kind ", kind);
  auto native = [&](const at::Tensor& t) {
    const auto st = t.scalar_type();
    const at::Tensor u = (st == at::kFloat || st == at::kBFloat16 || st == at::kHalf) ? t : t.to(at::kFloat);
    return u.stride(-1) == 1 ? u : u.contiguous();
  };
  at::Tensor q = native(q_in), k = native(k_in), v = native(v_in);
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3), Dv = v.size(3), H = k.size(2);
  TORCH_CHECK_VALUE(H > 0 && Hq % H == 0 && k.size(1) == T && v.size(1) == T && v.size(2) == H,
                    "q, k, v must be [B, T, H, D], [B, T, H_kv, D], [B, T, H_kv, Dv]");
  const int64_t G = Hq / H, m = WT.size(2), F = kind == KIND_EXP ? m : 2 * m, nt = std::max<int64_t>(window - 1, 0);
  const bool varlen = cu.has_value() && cu->defined();
  const at::Tensor offsets = varlen ? cu->to(at::kLong).contiguous() : at::Tensor();
  const int64_t R = varlen ? offsets.size(0) - 1 : B;
  const int64_t* cp = varlen ? offsets.data_ptr<int64_t>() : nullptr;
  TORCH_CHECK_VALUE(!varlen || (B == 1 && cp[0] == 0 && cp[R] == T), "cu_seqlens must run from 0 to T over B = 1");
  TORCH_CHECK_VALUE(WT.scalar_type() == at::kFloat && WT.is_contiguous() && WT.size(0) == H && WT.size(1) == D,
                    "WT must be a contiguous fp32 [H_kv, D, m] tensor");
  TORCH_CHECK_VALUE(bias.sizes() == at::IntArrayRef({R, H, m}) && freq.sizes() == at::IntArrayRef({R, H}) &&
                        S0.sizes() == at::IntArrayRef({R, H, F, Dv}) && z0.sizes() == at::IntArrayRef({R, H, F}) &&
                        m0.sizes() == at::IntArrayRef({R, H}) && k_tail.sizes() == at::IntArrayRef({R, H, nt, D}) &&
                        v_tail.sizes() == at::IntArrayRef({R, H, nt, Dv}) &&
                        tail_keep.sizes() == at::IntArrayRef({R, nt}),
                    "window_forward: parameter or state shapes do not match the inputs");
  const bool has_sinks = sink_k.has_value() && sink_k->defined();
  const int64_t NS = has_sinks ? sink_k->size(2) : 0;
  TORCH_CHECK_VALUE(window >= 1 || NS > 0, "window_forward: window 0 needs sinks");
  if (has_sinks) {
    TORCH_CHECK_VALUE(sink_v.has_value() && sink_from.has_value() && sink_skip.has_value(),
                      "window_forward: sink_k needs sink_v, sink_from and sink_skip");
    TORCH_CHECK_VALUE(sink_k->scalar_type() == at::kFloat && sink_k->is_contiguous() &&
                          sink_k->sizes() == at::IntArrayRef({R, H, NS, D}) && sink_v->scalar_type() == at::kFloat &&
                          sink_v->is_contiguous() && sink_v->sizes() == at::IntArrayRef({R, H, NS, Dv}) &&
                          sink_from->scalar_type() == at::kLong && sink_from->is_contiguous() &&
                          sink_from->sizes() == at::IntArrayRef({R, NS}) && sink_skip->scalar_type() == at::kLong &&
                          sink_skip->is_contiguous() && sink_skip->sizes() == at::IntArrayRef({R}),
                      "window_forward: sink slot shapes or dtypes do not match the inputs");
  }
  const bool has_mix = log_mix.has_value() && log_mix->defined();
  TORCH_CHECK_VALUE(!has_mix || (log_mix->scalar_type() == at::kFloat && log_mix->is_contiguous() &&
                                 log_mix->sizes() == at::IntArrayRef({H})),
                    "window_forward: log_mix must be a contiguous fp32 [H_kv] tensor");
  std::vector<Span> spans;
  for (int64_t n = 0; n < R; ++n) spans.push_back(varlen ? Span{0, cp[n], cp[n + 1] - cp[n]} : Span{n, 0, T});
  at::Tensor mask;
  if (mask_in.has_value() && mask_in->defined()) mask = mask_in->to(at::kBool).contiguous();

  at::Tensor S = S0.clone(), z = z0.clone(), ms = m0.clone();
  at::Tensor kt_out = at::empty({R, H, nt, D}, k_tail.options());
  at::Tensor vt_out = at::empty({R, H, nt, Dv}, v_tail.options());
  at::Tensor keep_out = at::zeros({R, nt}, tail_keep.options());  // written by the tasks of head 0
  // causal training: each query row's (top, den), read by the fused backward
  at::Tensor stats = need_stats ? at::empty({B, T, Hq, 2}, q.options().dtype(at::kFloat)) : at::Tensor();
  float* statp = stats.defined() ? stats.data_ptr<float>() : nullptr;
  // non-causal training: each task's key shift (the maximum over its extended keys), read by the backward
  at::Tensor kshift = need_stats && !causal ? at::empty({R, H}, q.options().dtype(at::kFloat)) : at::Tensor();
  float* kshp = kshift.defined() ? kshift.data_ptr<float>() : nullptr;
  at::Tensor o = at::empty({B, T, Hq, Dv}, v.options());
  Config c{static_cast<int>(kind), static_cast<float>(c_t), static_cast<float>(c_o),
           static_cast<float>(std::sqrt(scale)), D, Dv, m, F, static_cast<float>(den_eps)};
  c.norm_queries = true;  // the exact part shares the query rows' normaliser
  const float* WTp = WT.data_ptr<float>();
  const float* biasp = bias.data_ptr<float>();
  const float* freqp = freq.data_ptr<float>();
  const float* psip = psi.has_value() && psi->defined() ? psi->data_ptr<float>() : nullptr;
  const bool* maskp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const bool* tkp = tail_keep.data_ptr<bool>();
  float* Sp = S.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  float* mp = ms.data_ptr<float>();
  const float* ktp = k_tail.data_ptr<float>();
  const float* vtp = v_tail.data_ptr<float>();
  float* kto = kt_out.data_ptr<float>();
  float* vto = vt_out.data_ptr<float>();
  bool* kpo = keep_out.data_ptr<bool>();
  const float* skp = has_sinks ? sink_k->data_ptr<float>() : nullptr;
  const float* svp = has_sinks ? sink_v->data_ptr<float>() : nullptr;
  const int64_t* sfp = has_sinks ? sink_from->data_ptr<int64_t>() : nullptr;
  const int64_t* ssp = has_sinks ? sink_skip->data_ptr<int64_t>() : nullptr;
  const float* lmp = has_mix ? log_mix->data_ptr<float>() : nullptr;

  std::vector<int64_t> lengths(R * H);
  // (the workspaces also hold chunks of the tail and the band beyond T)
  for (int64_t i = 0; i < R * H; ++i) lengths[i] = spans[i / H].T + 2 * window + 1;
  const int64_t work_per_token =
      F * (D + Dv) * (G + 1) + (std::min<int64_t>(window, T + nt) + NS) * (D + Dv) * G;
  RF_DISPATCH(q.scalar_type(), "rf_window_cpu_qk", [&] {
    using qk_t = scalar_t;
    RF_DISPATCH(v.scalar_type(), "rf_window_cpu_v", [&] {
      using v_t = scalar_t;
      run_tasks(R * H, lengths, work_per_token, varlen, c, [&](int64_t i, Workspace& w) {
        thread_local WindowBuffers wb;
        const Span& span = spans[i / H];
        const int64_t n = i / H, h = i % H;
        HeadParams hp{WTp + h * D * m, biasp + i * m, freqp[i], psip ? psip + i * D : nullptr};
        ExtKeys<qk_t, v_t> ext{ktp + i * nt * D,
                               vtp + i * nt * Dv,
                               tkp + n * nt,
                               k.data_ptr<qk_t>() + span.b * k.stride(0) + span.start * k.stride(1) + h * k.stride(2),
                               v.data_ptr<v_t>() + span.b * v.stride(0) + span.start * v.stride(1) + h * v.stride(2),
                               k.stride(1),
                               v.stride(1),
                               maskp ? maskp + span.b * T + span.start : nullptr,
                               nt,
                               D,
                               Dv,
                               ssp ? ssp[n] : 0};
        Sinks sk;
        if (has_sinks) {
          sk.k = skp + i * NS * D;
          sk.v = svp + i * NS * Dv;
          sk.from = sfp + n * NS;
          sk.S = NS;
        }
        sk.log_mix = lmp ? lmp[h] : 0.f;
        WindowTask wt{window, static_cast<float>(exact_sq), causal, !std::isinf(mp[i])};
        // every head of a sequence computes the same tail flags; head 0 writes them
        window_group<qk_t, v_t>(q, o, ext, span, h, G, c, hp, wt, w, wb, sk, Sp + i * F * Dv, zp + i * F, mp[i],
                                kto + i * nt * D, vto + i * nt * Dv, h == 0 ? kpo + n * nt : nullptr, statp,
                                kshp ? kshp + i : nullptr);
      });
    });
  });
  if (o.scalar_type() != v_in.scalar_type()) o = o.to(v_in.scalar_type());
  return {o, S, z, ms, kt_out, vt_out, keep_out, stats, kshift};
}

}  // namespace
