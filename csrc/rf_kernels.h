// Small dense building blocks of the CPU backend: a register-blocked fp32 GEMM written with GCC/Clang
// vector extensions (lowered to AVX-512, AVX2 or SSE by the compiler), a vectorisable exp, reductions.
#pragma once

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace rf {

constexpr int KIND_EXP = 0, KIND_HYP = 1, KIND_TRIG = 2, KIND_NORM_HYP = 3;  // components.EXP, HYP, TRIG, NORM_HYP

#if defined(__AVX512F__)
constexpr int VW = 16;  // floats per vector register
constexpr int RB = 8;   // rows of the GEMM micro-tile
#else
constexpr int VW = 8;
constexpr int RB = 4;
#endif
constexpr int NV = 2;  // vectors per row of the micro-tile: the tile is RB x (NV * VW)

typedef float vf __attribute__((vector_size(VW * sizeof(float))));

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}

inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

inline vf splat(float s) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(s);
#elif defined(__AVX__)
  return (vf)_mm256_set1_ps(s);
#else
  vf v;
  for (int i = 0; i < VW; ++i) v[i] = s;
  return v;
#endif
}

// C[R, NW * VW] (+)= A[R, K] @ B[K, NW * VW], the accumulators held in registers.
template <int R, int NW>
inline void micro_tile(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                       int64_t ldc, bool accumulate) {
  vf c[R][NW];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NW; ++j) c[r][j] = accumulate ? vload(C + r * ldc + j * VW) : vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf b[NW];
#pragma GCC unroll 4
    for (int j = 0; j < NW; ++j) b[j] = vload(B + k * ldb + j * VW);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const vf a = splat(A[r * lda + k]);
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) c[r][j] += a * b[j];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NW; ++j) vstore(C + r * ldc + j * VW, c[r][j]);
}

// Columns [j0, N) that do not fill a vector, for R rows.
inline void tail_tile(int64_t R, int64_t j0, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                      int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t j = j0; j < N; ++j) {
      float s = accumulate ? C[r * ldc + j] : 0.f;
      for (int64_t k = 0; k < K; ++k) s += A[r * lda + k] * B[k * ldb + j];
      C[r * ldc + j] = s;
    }
  }
}

template <int R>
inline void row_block(int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                      int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + NV * VW <= N; j += NV * VW) micro_tile<R, NV>(K, A, lda, B + j, ldb, C + j, ldc, accumulate);
  for (; j + VW <= N; j += VW) micro_tile<R, 1>(K, A, lda, B + j, ldb, C + j, ldc, accumulate);
  if (j < N) tail_tile(R, j, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// Triangular restrictions of gemm: for the row block [i, i + R), TRI_N computes only the columns below
// i + R rounded up to whole vectors (the rest of the block is left untouched); TRI_K sums only
// k < i + R (A lower triangular).
enum Tri { FULL = 0, TRI_N = 1, TRI_K = 2 };

// C[M, N] (+)= A[M, K] @ B[K, N], row-major with leading dimensions lda, ldb, ldc.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 float* C, int64_t ldc, bool accumulate, Tri tri = FULL) {
  int64_t i = 0;
  auto block = [&](auto rows_tag) {
    constexpr int R = decltype(rows_tag)::value;
    const int64_t n = tri == TRI_N ? std::min(N, (i + R + VW - 1) / VW * VW) : N;
    const int64_t k = tri == TRI_K ? std::min(K, i + R) : K;
    row_block<R>(n, k, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
    i += R;
  };
  while (M - i >= RB) block(std::integral_constant<int, RB>{});
  if (RB > 4 && M - i >= 4) block(std::integral_constant<int, 4>{});
  if (M - i >= 2) block(std::integral_constant<int, 2>{});
  if (M - i >= 1) block(std::integral_constant<int, 1>{});
}

// C[n, N] = A[n, n] @ B[n, N] with A lower triangular (its upper triangle is ignored by the zeros
// stored there, and only the needed prefix of k is summed).
inline void gemm_lower(int64_t n, int64_t N, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                       int64_t ldc) {
  gemm(n, N, n, A, lda, B, ldb, C, ldc, false, TRI_K);
}

// exp(x) for fp32: Cody-Waite range reduction and the Cephes degree-6 polynomial (about 1 ulp), written
// once for a scalar type T (float or vf) so the same code serves whole registers and the tail.
// Below the smallest normal result it returns 0; exp(-inf) = 0.
typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));

constexpr float EXP_LO = -87.33654f, EXP_HI = 88.72283f;

inline vf exp_vec(vf x) {
  const vf lo = splat(EXP_LO), hi = splat(EXP_HI);
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding and subtracting it rounds to nearest
  const vf n = (xc * 1.44269504088896341f + magic) - magic;
  vf r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  const vf y = p * (vf)bits;
  return x < lo ? vf{} : y;
}

inline float exp_scalar(float x) {
  vf v = splat(x);
  return exp_vec(v)[0];
}

// e[i] = exp(e[i] - shift).
inline void exp_shifted(float* e, int64_t n, float shift) {
  const vf s = splat(shift);
  int64_t i = 0;
  for (; i + VW <= n; i += VW) vstore(e + i, exp_vec(vload(e + i) - s));
  for (; i < n; ++i) e[i] = exp_scalar(e[i] - shift);
}

inline float hmax(vf v) {
  float mx = v[0];
  for (int i = 1; i < VW; ++i) mx = std::max(mx, v[i]);
  return mx;
}

inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}

inline float row_max(const float* x, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (n >= VW) {
    vf acc[2] = {vload(x), vload(x)};
    for (; i + 2 * VW <= n; i += 2 * VW) {
      for (int j = 0; j < 2; ++j) {
        const vf v = vload(x + i + j * VW);
        acc[j] = v > acc[j] ? v : acc[j];
      }
    }
    for (; i + VW <= n; i += VW) {
      const vf v = vload(x + i);
      acc[0] = v > acc[0] ? v : acc[0];
    }
    mx = std::max(hmax(acc[0]), hmax(acc[1]));
  }
  for (; i < n; ++i) mx = std::max(mx, x[i]);
  return mx;
}

inline float dot(const float* a, const float* b, int64_t n) {
  vf acc[2] = {vf{}, vf{}};
  int64_t i = 0;
  for (; i + 2 * VW <= n; i += 2 * VW)
    for (int j = 0; j < 2; ++j) acc[j] += vload(a + i + j * VW) * vload(b + i + j * VW);
  for (; i + VW <= n; i += VW) acc[0] += vload(a + i) * vload(b + i);
  float s = hsum(acc[0] + acc[1]);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// log(sum_i exp(x[i])) over one row (hedgehog's per-row normaliser); -inf for an empty or all -inf row.
inline float row_lse(const float* x, int64_t n) {
  const float mx = row_max(x, n);
  if (!(mx > -std::numeric_limits<float>::infinity())) return mx;
  const vf s = splat(mx);
  vf acc = vf{};
  int64_t i = 0;
  for (; i + VW <= n; i += VW) acc += exp_vec(vload(x + i) - s);
  float sum = hsum(acc);
  for (; i < n; ++i) sum += exp_scalar(x[i] - mx);
  return mx + std::log(sum);
}

inline float row_sum(const float* x, int64_t n) {
  vf acc = vf{};
  int64_t i = 0;
  for (; i + VW <= n; i += VW) acc += vload(x + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += x[i];
  return s;
}

inline void scale_inplace(float* x, int64_t n, float alpha) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= alpha;
}

// Feature exponents e [n, F] of the kinds EXP, HYP, TRIG, NORM_HYP (components.feature_logits; NORM_HYP minus
// each row's log-sum-exp when `normalise`, else as HYP) from the projections
// u [n, m] and r [n] (r = c_t |x'|^2 + c_o |x|^2), and for TRIG the cos/sin factors into mult [n, F].
inline void feature_exponents(int kind, const float* u, const float* r, int64_t n, int64_t m, float freq,
                              const float* bias, float* e, float* mult, bool normalise = false) {
  const int64_t F = kind == KIND_EXP ? m : 2 * m;
  for (int64_t t = 0; t < n; ++t) {
    const float* ur = u + t * m;
    float* er = e + t * F;
    const float rt = r[t];
    if (kind == KIND_EXP) {
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) er[i] = bias[i] + freq * ur[i] + rt;
    } else if (kind == KIND_HYP || kind == KIND_NORM_HYP) {
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) {
        er[i] = bias[i] + freq * ur[i] + rt;
        er[m + i] = bias[i] - freq * ur[i] + rt;
      }
      if (kind == KIND_NORM_HYP && normalise) {  // hedgehog: minus the row's log-sum-exp
        const float lse = row_lse(er, F);
#pragma omp simd
        for (int64_t i = 0; i < F; ++i) er[i] -= lse;
      }
    } else {
      float* mr = mult + t * F;
      for (int64_t i = 0; i < m; ++i) {
        er[i] = er[m + i] = bias[i] + rt;
        const float a = freq * ur[i];
        mr[i] = std::cos(a);
        mr[m + i] = std::sin(a);
      }
    }
  }
}

}  // namespace rf
