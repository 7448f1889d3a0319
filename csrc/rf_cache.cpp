// The exact cache's fold on the CPU (DESIGN.md section 9; ops/cpu/cache.py's decoding step): one key per
// (sequence, key/value head) leaves the cache for the feature state, and the cache closes the gap.
//
// Included by rf_attention.cpp (one translation unit). The decision (which key) is taken in PyTorch by the
// score of cache.py, so that every backend decides alike; this file does what follows it, which in PyTorch is
// some thirty small operations: the state moves to the new running maximum of the key exponents and takes the
// key's features times its value (reference._rescale and cache.admit), and the slots after the folded key move
// up by one (the slots stay in arrival order).

namespace {

std::vector<at::Tensor> rf_cache_fold(const at::Tensor& S0, const at::Tensor& z0, const at::Tensor& m0,
                                      const at::Tensor& e, const c10::optional<at::Tensor>& mult,
                                      const at::Tensor& ck, const at::Tensor& cv, const at::Tensor& loser) {
  // S0 [R, H, F, Dv], z0 [R, H, F], m0 [R, H] (the state, S and z stored divided by exp(safe(m0)));
  // e [R, H, N, F] the feature exponents of the N = C + 1 keys that competed (the C slots, then the
  // candidate), mult [R, H, N, F] their signs (trigonometric features) or none; ck [R, H, N, D], cv [R, H, N,
  // Dv] those keys and values; loser [R, H] int64 in [0, N): the one to fold. All fp32 contiguous.
  // Returns [S, z, log_scale, k_cache [R, H, C, D], v_cache [R, H, C, Dv]].
  auto f32 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.is_contiguous(); };
  TORCH_CHECK_VALUE(S0.dim() == 4 && e.dim() == 4 && ck.dim() == 4 && cv.dim() == 4,
                    "cache_fold: S, e, ck, cv must be 4-d");
  const int64_t R = S0.size(0), H = S0.size(1), F = S0.size(2), Dv = S0.size(3);
  const int64_t N = e.size(2), D = ck.size(3);
  TORCH_CHECK_VALUE(N >= 1 && z0.sizes() == at::IntArrayRef({R, H, F}) && m0.sizes() == at::IntArrayRef({R, H}) &&
                        e.sizes() == at::IntArrayRef({R, H, N, F}) && ck.sizes() == at::IntArrayRef({R, H, N, D}) &&
                        cv.sizes() == at::IntArrayRef({R, H, N, Dv}) && loser.sizes() == at::IntArrayRef({R, H}),
                    "cache_fold: shapes do not match");
  TORCH_CHECK_VALUE(f32(S0) && f32(z0) && f32(m0) && f32(e) && f32(ck) && f32(cv),
                    "cache_fold: S, z, log_scale, e, ck, cv must be contiguous fp32");
  TORCH_CHECK_VALUE(loser.scalar_type() == at::kLong && loser.is_contiguous(), "cache_fold: loser must be int64");
  const bool has_mult = mult.has_value() && mult->defined();
  TORCH_CHECK_VALUE(!has_mult || (f32(*mult) && mult->sizes() == e.sizes()),
                    "cache_fold: mult must be a contiguous fp32 tensor shaped as e");
  const int64_t* lp = loser.data_ptr<int64_t>();
  for (int64_t i = 0; i < R * H; ++i)
    TORCH_CHECK_VALUE(lp[i] >= 0 && lp[i] < N, "cache_fold: loser ", lp[i], " is not a slot of ", N);

  at::Tensor S = at::empty_like(S0), z = at::empty_like(z0), m = at::empty_like(m0);
  at::Tensor kc = at::empty({R, H, N - 1, D}, ck.options()), vc = at::empty({R, H, N - 1, Dv}, cv.options());
  const float *S0p = S0.data_ptr<float>(), *z0p = z0.data_ptr<float>(), *m0p = m0.data_ptr<float>();
  const float *ep = e.data_ptr<float>(), *mp = has_mult ? mult->data_ptr<float>() : nullptr;
  const float *ckp = ck.data_ptr<float>(), *cvp = cv.data_ptr<float>();
  float *Sp = S.data_ptr<float>(), *zp = z.data_ptr<float>(), *msp = m.data_ptr<float>();
  float *kcp = kc.data_ptr<float>(), *vcp = vc.data_ptr<float>();
  for (int64_t i = 0; i < R * H; ++i) {  // a handful of (sequence, head) pairs: no threads
    const int64_t l = lp[i];
    const float* el = ep + (i * N + l) * F;
    const float* ml = mp ? mp + (i * N + l) * F : nullptr;
    const float* vl = cvp + (i * N + l) * Dv;
    float top = m0p[i];  // the running maximum with the folded key's exponents
    for (int64_t f = 0; f < F; ++f) top = std::max(top, el[f]);
    const float shift = std::isinf(top) && top < 0 ? 0.f : top;  // state.safe_log_scale
    const float alpha = std::exp(m0p[i] - shift);                // 0 while the state is empty
    msp[i] = top;
    const float* Si = S0p + i * F * Dv;
    float* So = Sp + i * F * Dv;
    for (int64_t f = 0; f < F; ++f) {
      float phi = std::exp(el[f] - shift);
      if (ml) phi *= ml[f];
      zp[i * F + f] = z0p[i * F + f] * alpha + phi;
      for (int64_t d = 0; d < Dv; ++d) So[f * Dv + d] = Si[f * Dv + d] * alpha + phi * vl[d];
    }
    // the slots without the folded key, in arrival order
    for (int64_t s = 0, o = 0; s < N; ++s) {
      if (s == l) continue;
      std::memcpy(kcp + (i * (N - 1) + o) * D, ckp + (i * N + s) * D, D * sizeof(float));
      std::memcpy(vcp + (i * (N - 1) + o) * Dv, cvp + (i * N + s) * Dv, Dv * sizeof(float));
      ++o;
    }
  }
  return {S, z, m, kc, vc};
}

}  // namespace
