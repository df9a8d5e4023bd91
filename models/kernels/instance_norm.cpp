// Fused CPU kernels for models/norm.py's InstanceNorm (float32, float64, bfloat16 and float16), compiled on first use
// by models/kernels/build.py (torch.utils.cpp_extension) and registered as torch.ops.faststyle_norm.{forward,backward}.
//
// Memory layouts (the ops take (N, C, *spatial) tensors whole, see check_input; M = the spatial positions):
//   rows  (NCHW):          x is (N, C, M), one row of M spatial positions per (n, c); rows run in parallel and each
//                          row is read for its statistics and then again for the output while it is still in cache
//                          (16-bit rows: kept in float, see kRowBuf).
//   chans (channels-last): x is (N, M, C); work is split into blocks of positions (parallel), the inner loops run
//                          over the contiguous channels (vectorised), per-block partial sums are combined afterwards.
//
// Statistics: each chunk of ~2048 values (in L1) is summed in the input type, its mean taken, then the corrected
// two-pass sums sum(x - m), sum((x - m)^2) around that chunk mean (Chan, Golub & LeVeque 1983); the chunks are
// combined in double with Chan's pairwise update. So the variance is stable at large offsets (randn + 1e4) while
// memory is read once.
// Forward : y  = (x - m) * scale + shift, scale = gamma * rstd (m = the mean rounded to the input type; shift
//           carries the rounding error m - mean in double).
// Large float32 NCHW outputs are written with streaming stores (see kStreamBytes).
// bfloat16 / float16 (storage types): x, y, grad and dx stay 16-bit in memory; each chunk is widened into a float
// buffer (in L1; the NCHW rows keep their whole row there for the second sweep), every sum and product is taken in
// float on it exactly as for float32 inputs, and the output chunk is rounded back to 16 bits (round to nearest even).
// Weight and bias are taken in float32 (converted if they come in the 16-bit type) and the weight/bias gradients
// returned in float32, which keeps them from being rounded to 8 mantissa bits. So a 16-bit tensor is read and
// written in 16 bits only, without the float32 copies an upcast would make.
// Backward: with S = sum(g * (x - mean)), sg = sum(g), a = gamma * rstd (Ioffe & Szegedy 2015, per instance):
//           dx = a * g - a * sg / M - a * rstd^2 * S / M * (x - mean).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FASTSTYLE_STREAM 1
#elif defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kChunk = 2048;      // values per statistics chunk (8 KB of float: stays in L1 for the 2nd sweep)
constexpr int64_t kBlock = 1 << 15;   // values per parallel task in the channels-last layout

// Running (count, mean, M2) in double, merged with Chan et al.'s pairwise formula.
struct Stat {
  double n = 0.0, mean = 0.0, m2 = 0.0;
  void merge(double nb, double mb, double m2b) {
    if (nb == 0.0) return;
    const double tot = n + nb;
    const double delta = mb - mean;
    mean += delta * nb / tot;
    m2 += m2b + delta * delta * n * nb / tot;
    n = tot;
  }
};

// Storage type S -> the type the arithmetic runs in: float/double compute in themselves, the 16-bit types in float.
template <typename S>
struct ComputeOf {
  using type = S;
};
template <>
struct ComputeOf<c10::BFloat16> {
  using type = float;
};
template <>
struct ComputeOf<c10::Half> {
  using type = float;
};
template <typename S>
using acc_t = typename ComputeOf<S>::type;
template <typename S>
inline constexpr bool kNarrow = !std::is_same_v<S, acc_t<S>>;

// bf16 -> float is exact: the 16 bits are the float's upper half. Plain shifts and masks (here and below) so that
// the loops using them vectorise on any instruction set.
inline float to_float(c10::BFloat16 v) {
  const uint32_t u = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float16 is rare on CPUs: c10's conversions (correct rounding, subnormals, inf/NaN) are enough.
inline float to_float(c10::Half v) { return float(v); }

// float -> S, rounded to nearest even; for bf16 a NaN stays a (quiet) NaN instead of rounding into an infinity.
template <typename S>
inline S from_float(float f);

template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return c10::BFloat16(uint16_t(nan ? (u >> 16) | 0x40u : rounded), c10::BFloat16::from_bits());
}

template <>
inline c10::Half from_float<c10::Half>(float f) {
  return c10::Half(f);
}

template <typename S>
inline void widen(const S* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename S>
inline void narrow(const float* src, S* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<S>(src[i]);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define FASTSTYLE_BF16_CVT 1
// 32 floats (lo: the first 16) rounded to bf16 and stored at dst. With AVX512-BF16 one vcvtne2ps2bf16 does it (round
// to nearest even, NaN quieted as in from_float) where the integer rounding takes about a dozen instructions; but it
// flushes subnormal inputs to zero, so a block holding one is rounded by from_float instead (same results).
inline void store_bf16x32(__m512 lo, __m512 hi, c10::BFloat16* dst) {
  constexpr int kSubnormal = 0x20;  // vfpclassps category: denormal
  if ((_mm512_fpclass_ps_mask(lo, kSubnormal) | _mm512_fpclass_ps_mask(hi, kSubnormal)) == 0) {
    _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    return;
  }
  alignas(64) float tmp[32];
  _mm512_store_ps(tmp, lo);
  _mm512_store_ps(tmp + 16, hi);
  for (int k = 0; k < 32; ++k) dst[k] = from_float<c10::BFloat16>(tmp[k]);
}

template <>
inline void narrow<c10::BFloat16>(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) store_bf16x32(_mm512_loadu_ps(src + i), _mm512_loadu_ps(src + i + 16), dst + i);
  for (; i < n; ++i) dst[i] = from_float<c10::BFloat16>(src[i]);
}
#endif

// y[i] = (x[i] - mf) * sc + sh rounded to S: forward_rows' 16-bit output sweep, from the widened row.
template <typename S>
inline void affine_narrow(const float* x, S* y, int64_t n, float mf, float sc, float sh) {
  int64_t i = 0;
#ifdef FASTSTYLE_BF16_CVT
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const __m512 vm = _mm512_set1_ps(mf), vs = _mm512_set1_ps(sc), vh = _mm512_set1_ps(sh);
    for (; i + 32 <= n; i += 32) {
      store_bf16x32(_mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm), vs, vh),
                    _mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), vm), vs, vh), y + i);
    }
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j) y[j] = from_float<S>((x[j] - mf) * sc + sh);
}

// dx[i] = a * g[i] + (c1 * (x[i] - mf) + c0) rounded to S: backward_rows' 16-bit dx sweep, from the widened row.
template <typename S>
inline void grad_narrow(const float* g, const float* x, S* dx, int64_t n, float mf, float a, float c1, float c0) {
  int64_t i = 0;
#ifdef FASTSTYLE_BF16_CVT
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const __m512 vm = _mm512_set1_ps(mf), va = _mm512_set1_ps(a), v1 = _mm512_set1_ps(c1), v0 = _mm512_set1_ps(c0);
    for (; i + 32 <= n; i += 32) {
      const __m512 lo = _mm512_fmadd_ps(va, _mm512_loadu_ps(g + i),
                                        _mm512_fmadd_ps(v1, _mm512_sub_ps(_mm512_loadu_ps(x + i), vm), v0));
      const __m512 hi = _mm512_fmadd_ps(va, _mm512_loadu_ps(g + i + 16),
                                        _mm512_fmadd_ps(v1, _mm512_sub_ps(_mm512_loadu_ps(x + i + 16), vm), v0));
      store_bf16x32(lo, hi, dx + i);
    }
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j) dx[j] = from_float<S>(a * g[j] + (c1 * (x[j] - mf) + c0));
}

// Independent partial sums per reduction in the 16-bit row loops: a single vector accumulator makes every add wait
// for the previous one (latency-bound); this many lanes fill several vector registers and keep the adders busy.
#ifdef __AVX512F__
constexpr int64_t kLanes = 64;
#else
constexpr int64_t kLanes = 32;
#endif

// The total of kLanes partial sums, added pairwise in halving vector steps (kLanes dependent scalar adds would cost
// as much as a sweep over a short row).
inline float lane_sum(float* v) {
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) v[j] += v[j + w];
  }
  return v[0];
}

// The values src[0, n) in the compute type: src itself for float/double, else widened into buf.
template <typename S>
inline const acc_t<S>* as_compute(const S* src, int64_t n, acc_t<S>* buf) {
  if constexpr (kNarrow<S>) {
    widen(src, buf, n);
    return buf;
  } else {
    (void)n;
    (void)buf;
    return src;
  }
}

// Streaming (non-temporal) stores for the output sweeps of large float32 NCHW tensors: a normal store first reads
// the destination cache line from memory (read-for-ownership), a third of the traffic of these sweeps, and an output
// of 4 MiB or more is unlikely to stay in a core's share of the last-level cache anyway. Smaller tensors, float64
// and CPUs without AVX2/FMA take the plain loops (so their results are bit-for-bit those of the plain loops).
constexpr int64_t kStreamBytes = int64_t(1) << 22;

#ifdef FASTSTYLE_STREAM
// y = (x - mf) * sc + sh
inline void affine_row_stream(const float* x, float* y, int64_t M, float mf, float sc, float sh) {
  int64_t i = 0;
  for (; i < M && (reinterpret_cast<std::uintptr_t>(y + i) & 31); ++i) y[i] = (x[i] - mf) * sc + sh;
  const __m256 vm = _mm256_set1_ps(mf), vs = _mm256_set1_ps(sc), vh = _mm256_set1_ps(sh);
  for (; i + 8 <= M; i += 8)
    _mm256_stream_ps(y + i, _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), vs, vh));
  for (; i < M; ++i) y[i] = (x[i] - mf) * sc + sh;
}

// dx = a * g + (c1 * (x - mf) + c0)
inline void grad_row_stream(const float* g, const float* x, float* dx, int64_t M, float mf, float a, float c1,
                            float c0) {
  int64_t i = 0;
  for (; i < M && (reinterpret_cast<std::uintptr_t>(dx + i) & 31); ++i) dx[i] = a * g[i] + c1 * (x[i] - mf) + c0;
  const __m256 vm = _mm256_set1_ps(mf), va = _mm256_set1_ps(a), v1 = _mm256_set1_ps(c1), v0 = _mm256_set1_ps(c0);
  for (; i + 8 <= M; i += 8) {
    const __m256 xc = _mm256_sub_ps(_mm256_loadu_ps(x + i), vm);
    _mm256_stream_ps(dx + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(g + i), _mm256_fmadd_ps(v1, xc, v0)));
  }
  for (; i < M; ++i) dx[i] = a * g[i] + c1 * (x[i] - mf) + c0;
}
#endif

template <typename T>
inline bool use_stream(int64_t numel) {
#ifdef FASTSTYLE_STREAM
  return std::is_same_v<T, float> && numel * int64_t(sizeof(T)) >= kStreamBytes;
#else
  (void)numel;
  return false;
#endif
}

// The normalisation of one (n, c) instance (flat index r) from its statistics: records its mean, biased variance
// and rstd, and returns the coefficients of y = (x - mf) * sc + sh in the compute type. mf is the mean rounded to T;
// sh carries the rounding error mf - mean in double (so every path normalises with the same numbers).
template <typename T>
struct Affine {
  T mf, sc, sh;
};

template <typename T>
Affine<T> normalisation(const Stat& s, int64_t M, double eps, const T* w, const T* b, int64_t c, int64_t r,
                        double* mean, double* var, double* rstd) {
  const double v = s.m2 / double(M);
  const double rs = 1.0 / std::sqrt(v + eps);
  const double scale = rs * (w ? double(w[c]) : 1.0);
  const T mf = T(s.mean);
  mean[r] = s.mean;
  var[r] = v;
  rstd[r] = rs;
  return {mf, T(scale), T((b ? double(b[c]) : 0.0) + scale * (double(mf) - s.mean))};
}

// ---------------------------------------------------------------- rows (NCHW) ------------------------------------
template <typename T>
Stat row_stats(const T* x, int64_t m) {
  Stat s;
  for (int64_t i0 = 0; i0 < m; i0 += kChunk) {
    const int64_t len = std::min(kChunk, m - i0);
    const T* p = x + i0;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < len; ++i) sum += p[i];
    const T cm = sum / T(len);
    T sd = 0, sq = 0;
#pragma omp simd reduction(+ : sd, sq)
    for (int64_t i = 0; i < len; ++i) {
      const T d = p[i] - cm;
      sd += d;
      sq += d * d;
    }
    // corrected two-pass: sd measures the rounding error of cm
    const double dsd = double(sd), dlen = double(len);
    s.merge(dlen, double(cm) + dsd / dlen, std::max(double(sq) - dsd * dsd / dlen, 0.0));
  }
  return s;
}

// Longest 16-bit row that the row sweeps keep whole in float between their two sweeps: 64K floats (256 KB) per
// buffer stay in a core's L2, so the second sweep reads floats instead of converting the row again. A longer row is
// widened again chunk by chunk in the second sweep (into a one-chunk buffer).
constexpr int64_t kRowBuf = int64_t(1) << 16;

// Float scratch for one parallel task of a 16-bit row sweep: the whole row when `whole`, else one chunk.
inline std::unique_ptr<float[]> row_buffer(int64_t M, bool whole) {
  return std::unique_ptr<float[]>(new float[whole ? M : std::min(M, kChunk)]);
}

// row_stats for a 16-bit row: the same chunked corrected two-pass sums in float, with kLanes partial sums per
// reduction. Each chunk is widened once, as the first pass reads it, into buf (at its offset in the row when
// `whole`, else at buf[0]); the second pass reads the floats from there (in L1), and so can the output sweep.
template <typename S>
Stat row_stats_narrow(const S* x, int64_t m, float* buf, bool whole) {
  Stat s;
  for (int64_t i0 = 0; i0 < m; i0 += kChunk) {
    const int64_t len = std::min(kChunk, m - i0), full = len / kLanes * kLanes;
    const S* p = x + i0;
    float* c = whole ? buf + i0 : buf;
    float acc[kLanes] = {};
    for (int64_t i = 0; i < full; i += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const float v = to_float(p[i + j]);
        c[i + j] = v;
        acc[j] += v;
      }
    }
    float sum = lane_sum(acc);
    for (int64_t i = full; i < len; ++i) {
      c[i] = to_float(p[i]);
      sum += c[i];
    }
    const float cm = sum / float(len);
    float vd[kLanes] = {}, vq[kLanes] = {};
    for (int64_t i = 0; i < full; i += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const float d = c[i + j] - cm;
        vd[j] += d;
        vq[j] += d * d;
      }
    }
    float sd = lane_sum(vd), sq = lane_sum(vq);
    for (int64_t i = full; i < len; ++i) {
      const float d = c[i] - cm;
      sd += d;
      sq += d * d;
    }
    const double dsd = double(sd), dlen = double(len);
    s.merge(dlen, double(cm) + dsd / dlen, std::max(double(sq) - dsd * dsd / dlen, 0.0));
  }
  return s;
}

// Chunk sums sg = sum(g), sgx = sum(g * (x - mf)) of a 16-bit row (backward_rows' first sweep), added in double.
// Like row_stats_narrow it leaves the widened chunks of g and x in gbuf and xbuf for the dx sweep.
template <typename S>
void grad_sums_narrow(const S* g, const S* x, int64_t m, float mf, float* gbuf, float* xbuf, bool whole, double& sg,
                      double& sgx) {
  for (int64_t i0 = 0; i0 < m; i0 += kChunk) {
    const int64_t len = std::min(kChunk, m - i0), full = len / kLanes * kLanes;
    const S* gp = g + i0;
    const S* xp = x + i0;
    float* gc = whole ? gbuf + i0 : gbuf;
    float* xc = whole ? xbuf + i0 : xbuf;
    float v1[kLanes] = {}, v2[kLanes] = {};
    for (int64_t i = 0; i < full; i += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const float gv = to_float(gp[i + j]), xv = to_float(xp[i + j]);
        gc[i + j] = gv;
        xc[i + j] = xv;
        v1[j] += gv;
        v2[j] += gv * (xv - mf);
      }
    }
    float a1 = lane_sum(v1), a2 = lane_sum(v2);
    for (int64_t i = full; i < len; ++i) {
      gc[i] = to_float(gp[i]);
      xc[i] = to_float(xp[i]);
      a1 += gc[i];
      a2 += gc[i] * (xc[i] - mf);
    }
    sg += double(a1);
    sgx += double(a2);
  }
}

template <typename S, typename T = acc_t<S>>
void forward_rows(const S* x, S* y, const T* w, const T* b, int64_t N, int64_t C, int64_t M, double eps,
                  double* mean, double* var, double* rstd) {
  const int64_t grain = std::max<int64_t>(1, kBlock / std::max<int64_t>(M, 1));
  [[maybe_unused]] const bool stream = use_stream<S>(N * C * M);
  [[maybe_unused]] const bool whole = M <= kRowBuf;
  at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) {
    [[maybe_unused]] std::unique_ptr<float[]> buf;
    if constexpr (kNarrow<S>) buf = row_buffer(M, whole);
    for (int64_t r = r0; r < r1; ++r) {
      const S* xr = x + r * M;
      S* yr = y + r * M;
      Stat s;
      if constexpr (kNarrow<S>) {
        s = row_stats_narrow(xr, M, buf.get(), whole);
      } else {
        s = row_stats(xr, M);
      }
      const auto [mf, sc, sh] = normalisation(s, M, eps, w, b, r % C, r, mean, var, rstd);
      if constexpr (kNarrow<S>) {
        // chunk by chunk from the floats (widened again when the row was too long to keep)
        for (int64_t i0 = 0; i0 < M; i0 += kChunk) {
          const int64_t len = std::min(kChunk, M - i0);
          float* c = whole ? buf.get() + i0 : buf.get();
          if (!whole) widen(xr + i0, c, len);
          affine_narrow(c, yr + i0, len, mf, sc, sh);
        }
      } else {
#ifdef FASTSTYLE_STREAM
        if constexpr (std::is_same_v<T, float>) {
          if (stream) {
            affine_row_stream(xr, yr, M, mf, sc, sh);
            continue;
          }
        }
#endif
#pragma omp simd
        for (int64_t i = 0; i < M; ++i) yr[i] = (xr[i] - mf) * sc + sh;
      }
    }
#ifdef FASTSTYLE_STREAM
    if (stream) _mm_sfence();
#endif
  });
}

// Long on purpose (as forward_chans and backward_chans): one parallel loop whose sweeps share the per-task buffers
// and partial sums while they are in cache; split into functions, those would be passed around by the dozen without
// making either sweep easier to follow.
template <typename S, typename T = acc_t<S>>
void backward_rows(const S* g, const S* x, S* dx, const double* mean, const double* rstd, const T* w, int64_t N,
                   int64_t C, int64_t M, double* sg_out, double* sgxhat_out) {
  const int64_t grain = std::max<int64_t>(1, kBlock / std::max<int64_t>(M, 1));
  [[maybe_unused]] const bool stream = use_stream<S>(N * C * M);
  [[maybe_unused]] const bool whole = M <= kRowBuf;
  at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) {
    [[maybe_unused]] std::unique_ptr<float[]> gbuf, xbuf;
    if constexpr (kNarrow<S>) {
      gbuf = row_buffer(M, whole);
      xbuf = row_buffer(M, whole);
    }
    for (int64_t r = r0; r < r1; ++r) {
      const S* gr = g + r * M;
      const S* xr = x + r * M;
      S* dr = dx + r * M;
      const T mf = T(mean[r]);
      double sg = 0.0, sgx = 0.0;
      if constexpr (kNarrow<S>) {
        grad_sums_narrow(gr, xr, M, mf, gbuf.get(), xbuf.get(), whole, sg, sgx);
      } else {
        for (int64_t i0 = 0; i0 < M; i0 += kChunk) {
          const int64_t len = std::min(kChunk, M - i0);
          T a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
          for (int64_t i = i0; i < i0 + len; ++i) {
            a1 += gr[i];
            a2 += gr[i] * (xr[i] - mf);
          }
          sg += double(a1);
          sgx += double(a2);
        }
      }
      const double rs = rstd[r];
      const double Sx = sgx + sg * (double(mf) - mean[r]);  // sum(g * (x - mean))
      const double a = rs * (w ? double(w[r % C]) : 1.0);
      const double c1 = -a * rs * rs * Sx / double(M);
      const double c0 = -a * sg / double(M) + c1 * (double(mf) - mean[r]);
      const T ta = T(a), tc1 = T(c1), tc0 = T(c0);
      sg_out[r] = sg;
      sgxhat_out[r] = Sx * rs;
      if constexpr (kNarrow<S>) {
        // as in forward_rows: from the floats, chunk by chunk
        for (int64_t i0 = 0; i0 < M; i0 += kChunk) {
          const int64_t len = std::min(kChunk, M - i0);
          float* gc = whole ? gbuf.get() + i0 : gbuf.get();
          float* xc = whole ? xbuf.get() + i0 : xbuf.get();
          if (!whole) {
            widen(gr + i0, gc, len);
            widen(xr + i0, xc, len);
          }
          grad_narrow(gc, xc, dr + i0, len, mf, ta, tc1, tc0);
        }
      } else {
#ifdef FASTSTYLE_STREAM
        if constexpr (std::is_same_v<T, float>) {
          if (stream) {
            grad_row_stream(gr, xr, dr, M, mf, ta, tc1, tc0);
            continue;
          }
        }
#endif
#pragma omp simd
        for (int64_t i = 0; i < M; ++i) dr[i] = ta * gr[i] + tc1 * (xr[i] - mf) + tc0;
      }
    }
#ifdef FASTSTYLE_STREAM
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: make them visible before the region ends
#endif
  });
}

// ---------------------------------------------------------- channels-last (N, M, C) -------------------------------
// Positions per parallel task and per statistics chunk.
inline int64_t block_positions(int64_t C) { return std::max<int64_t>(1, kBlock / C); }
inline int64_t chunk_positions(int64_t C) { return std::max<int64_t>(1, kChunk / C); }

// The chunks of Q positions (Q * C values, contiguous) that the 16-bit paths widen: at most max(kChunk, C) floats.
template <typename S>
std::vector<acc_t<S>> chunk_buffer(int64_t C) {
  return std::vector<acc_t<S>>(kNarrow<S> ? chunk_positions(C) * C : 0);
}

// The statistics sweep of the channels-last layout: per (n, c) the mean, biased variance and rstd (double), and the
// output coefficients y = (x - mf) * sc + sh in the compute type (mf, sc, sh: N * C values each). Long on purpose:
// one parallel loop whose chunk sums share per-task buffers in cache, then the combination of the blocks.
template <typename S, typename T = acc_t<S>>
void chans_stats(const S* x, const T* w, const T* b, int64_t N, int64_t C, int64_t M, double eps, double* mean,
                 double* var, double* rstd, T* mf, T* sc, T* sh) {
  const int64_t P = block_positions(C), Q = chunk_positions(C);
  const int64_t nb = (M + P - 1) / P;
  // per (n, block, c) partial statistics
  std::vector<double> pn(N * nb * C), pm(N * nb * C), pq(N * nb * C);
  at::parallel_for(0, N * nb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> sum(C), cm(C), sd(C), sq(C);
    std::vector<T> buf = chunk_buffer<S>(C);
    std::vector<Stat> st(C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nb, blk = t % nb;
      const int64_t m0 = blk * P, m1 = std::min(M, m0 + P);
      std::fill(st.begin(), st.end(), Stat{});
      for (int64_t q0 = m0; q0 < m1; q0 += Q) {
        const int64_t q1 = std::min(m1, q0 + Q);
        const T* xq = as_compute(x + (n * M + q0) * C, (q1 - q0) * C, buf.data());  // the chunk's positions
        std::fill(sum.begin(), sum.end(), T(0));
        for (int64_t m = 0; m < q1 - q0; ++m) {
          const T* xm = xq + m * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) sum[c] += xm[c];
        }
        const T inv = T(1) / T(q1 - q0);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          cm[c] = sum[c] * inv;
          sd[c] = 0;
          sq[c] = 0;
        }
        for (int64_t m = 0; m < q1 - q0; ++m) {
          const T* xm = xq + m * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const T d = xm[c] - cm[c];
            sd[c] += d;
            sq[c] += d * d;
          }
        }
        const double len = double(q1 - q0);
        for (int64_t c = 0; c < C; ++c) {
          const double dsd = double(sd[c]);
          st[c].merge(len, double(cm[c]) + dsd / len, std::max(double(sq[c]) - dsd * dsd / len, 0.0));
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = t * C + c;
        pn[k] = st[c].n;
        pm[k] = st[c].mean;
        pq[k] = st[c].m2;
      }
    }
  });
  // combine the blocks of each (n, c)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      Stat s;
      for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t k = (n * nb + blk) * C + c;
        s.merge(pn[k], pm[k], pq[k]);
      }
      const int64_t r = n * C + c;
      const Affine<T> a = normalisation(s, M, eps, w, b, c, r, mean, var, rstd);
      mf[r] = a.mf;
      sc[r] = a.sc;
      sh[r] = a.sh;
    }
  }
}

template <typename S, typename T = acc_t<S>>
void forward_chans(const S* x, S* y, const T* w, const T* b, int64_t N, int64_t C, int64_t M, double eps,
                   double* mean, double* var, double* rstd) {
  const int64_t P = block_positions(C), Q = chunk_positions(C);
  const int64_t nb = (M + P - 1) / P;
  std::vector<T> mf(N * C), sc(N * C), sh(N * C);
  chans_stats(x, w, b, N, C, M, eps, mean, var, rstd, mf.data(), sc.data(), sh.data());
  at::parallel_for(0, N * nb, 1, [&](int64_t t0, int64_t t1) {
    [[maybe_unused]] std::vector<T> buf = chunk_buffer<S>(C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nb, blk = t % nb;
      const int64_t m0 = blk * P, m1 = std::min(M, m0 + P);
      const T* mfn = mf.data() + n * C;
      const T* scn = sc.data() + n * C;
      const T* shn = sh.data() + n * C;
      if constexpr (kNarrow<S>) {
        // a chunk of Q positions at a time: widen, normalise in the float buffer, round back
        for (int64_t q0 = m0; q0 < m1; q0 += Q) {
          const int64_t q1 = std::min(m1, q0 + Q), off = (n * M + q0) * C;
          widen(x + off, buf.data(), (q1 - q0) * C);
          for (int64_t m = 0; m < q1 - q0; ++m) {
            T* bm = buf.data() + m * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) bm[c] = (bm[c] - mfn[c]) * scn[c] + shn[c];
          }
          narrow(buf.data(), y + off, (q1 - q0) * C);
        }
        continue;
      }
      for (int64_t m = m0; m < m1; ++m) {
        const S* xm = x + (n * M + m) * C;
        S* ym = y + (n * M + m) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) ym[c] = (xm[c] - mfn[c]) * scn[c] + shn[c];
      }
    }
  });
}

// Long on purpose: one parallel loop whose sweeps share per-task buffers and sums in cache (see backward_rows).
template <typename S, typename T = acc_t<S>>
void backward_chans(const S* g, const S* x, S* dx, const double* mean, const double* rstd, const T* w, int64_t N,
                    int64_t C, int64_t M, double* sg_out, double* sgxhat_out) {
  const int64_t P = block_positions(C), Q = chunk_positions(C);
  const int64_t nb = (M + P - 1) / P;
  std::vector<T> mf(N * C);
  for (int64_t r = 0; r < N * C; ++r) mf[r] = T(mean[r]);
  std::vector<double> p1(N * nb * C), p2(N * nb * C);
  at::parallel_for(0, N * nb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> a1(C), a2(C);
    std::vector<T> gbuf = chunk_buffer<S>(C), xbuf = chunk_buffer<S>(C);
    std::vector<double> d1(C), d2(C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nb, blk = t % nb;
      const int64_t m0 = blk * P, m1 = std::min(M, m0 + P);
      const T* mfn = mf.data() + n * C;
      std::fill(d1.begin(), d1.end(), 0.0);
      std::fill(d2.begin(), d2.end(), 0.0);
      for (int64_t q0 = m0; q0 < m1; q0 += Q) {
        const int64_t q1 = std::min(m1, q0 + Q);
        std::fill(a1.begin(), a1.end(), T(0));
        std::fill(a2.begin(), a2.end(), T(0));
        const T* gq = as_compute(g + (n * M + q0) * C, (q1 - q0) * C, gbuf.data());
        const T* xq = as_compute(x + (n * M + q0) * C, (q1 - q0) * C, xbuf.data());
        for (int64_t m = 0; m < q1 - q0; ++m) {
          const T* gm = gq + m * C;
          const T* xm = xq + m * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            a1[c] += gm[c];
            a2[c] += gm[c] * (xm[c] - mfn[c]);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          d1[c] += double(a1[c]);
          d2[c] += double(a2[c]);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        p1[t * C + c] = d1[c];
        p2[t * C + c] = d2[c];
      }
    }
  });
  std::vector<T> ca(N * C), c1v(N * C), c0v(N * C);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      double sg = 0.0, sgx = 0.0;
      for (int64_t blk = 0; blk < nb; ++blk) {
        sg += p1[(n * nb + blk) * C + c];
        sgx += p2[(n * nb + blk) * C + c];
      }
      const int64_t r = n * C + c;
      const double rs = rstd[r];
      const double off = double(mf[r]) - mean[r];
      const double Sx = sgx + sg * off;
      const double a = rs * (w ? double(w[c]) : 1.0);
      const double c1 = -a * rs * rs * Sx / double(M);
      ca[r] = T(a);
      c1v[r] = T(c1);
      c0v[r] = T(-a * sg / double(M) + c1 * off);
      sg_out[r] = sg;
      sgxhat_out[r] = Sx * rs;
    }
  }
  at::parallel_for(0, N * nb, 1, [&](int64_t t0, int64_t t1) {
    [[maybe_unused]] std::vector<T> gbuf = chunk_buffer<S>(C), xbuf = chunk_buffer<S>(C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nb, blk = t % nb;
      const int64_t m0 = blk * P, m1 = std::min(M, m0 + P);
      const T* mfn = mf.data() + n * C;
      const T* an = ca.data() + n * C;
      const T* c1n = c1v.data() + n * C;
      const T* c0n = c0v.data() + n * C;
      if constexpr (kNarrow<S>) {
        // a chunk of Q positions at a time, as in forward_chans; dx is computed into gbuf
        for (int64_t q0 = m0; q0 < m1; q0 += Q) {
          const int64_t q1 = std::min(m1, q0 + Q), off = (n * M + q0) * C;
          widen(g + off, gbuf.data(), (q1 - q0) * C);
          widen(x + off, xbuf.data(), (q1 - q0) * C);
          for (int64_t m = 0; m < q1 - q0; ++m) {
            T* gm = gbuf.data() + m * C;
            const T* xm = xbuf.data() + m * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) gm[c] = an[c] * gm[c] + c1n[c] * (xm[c] - mfn[c]) + c0n[c];
          }
          narrow(gbuf.data(), dx + off, (q1 - q0) * C);
        }
        continue;
      }
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t off = (n * M + m) * C;
        const S* gm = g + off;
        const S* xm = x + off;
        S* dm = dx + off;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dm[c] = an[c] * gm[c] + c1n[c] * (xm[c] - mfn[c]) + c0n[c];
      }
    }
  });
}

// ------------------------------------------------------------------ op entry points ------------------------------
// x, grad (N, C, *spatial), at least one spatial dim, in one of two layouts: contiguous (channels_last false: the rows
// kernels see (N, C, M)) or channels-last contiguous, 4-D or 5-D (the chans kernels see (N, M, C)). Taking them
// whole, and allocating y / dx here in the same layout, saves the Python side a view and an allocation per tensor.
void check_input(const at::Tensor& t, const char* name, bool channels_last) {
  TORCH_CHECK(t.device().is_cpu(), "faststyle_norm: ", name, " must be on the CPU");
  const bool layout = channels_last ? (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                                          (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d))
                                    : t.dim() >= 3 && t.is_contiguous();
  TORCH_CHECK(layout, "faststyle_norm: ", name, " must be (N, C, *spatial) and ",
              channels_last ? "channels-last contiguous (4-D or 5-D)" : "contiguous");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, "faststyle_norm: ",
              name, " must be float32, float64, bfloat16 or float16");
}

// (N, C, M) of x: M is the number of spatial positions.
std::tuple<int64_t, int64_t, int64_t> ncm(const at::Tensor& x) {
  int64_t M = 1;
  for (int64_t d = 2; d < x.dim(); ++d) M *= x.size(d);
  return {x.size(0), x.size(1), M};
}

// The dtype of weight and bias (and of their gradients) for an input of dtype st: float32 for the 16-bit types.
at::ScalarType param_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// weight or bias: absent, or C values on the CPU in param_dtype(xt) or in xt itself (a network cast to bf16 / fp16);
// returned contiguous in param_dtype(xt). Converting C values here costs less than an op (and its autograd node) in
// Python; their gradients come back in param_dtype(xt), and autograd rounds them to the parameter's dtype.
at::Tensor checked_param(const std::optional<at::Tensor>& p, const char* name, at::ScalarType xt, int64_t C) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  const at::ScalarType pt = param_dtype(xt);
  TORCH_CHECK(p->device().is_cpu() && p->numel() == C && (p->scalar_type() == pt || p->scalar_type() == xt),
              "faststyle_norm: ", name, " must be ", C, " values on the CPU in ", pt, " or in x's dtype ", xt);
  return p->to(pt).contiguous();
}

// The (N, C) float64 mean, biased variance and rstd tensors the forward ops return.
std::tuple<at::Tensor, at::Tensor, at::Tensor> stat_tensors(const at::Tensor& x, int64_t N, int64_t C) {
  auto opts = x.options().dtype(at::kDouble);
  return {at::empty({N, C}, opts), at::empty({N, C}, opts), at::empty({N, C}, opts)};
}

// A checked_param's values, or nullptr when the parameter is absent.
template <typename T>
const T* param_ptr(const at::Tensor& p) {
  return p.defined() ? p.data_ptr<T>() : nullptr;
}

// Calls run(S{}) with the storage type of dtype st (checked by check_input).
template <typename F>
void dispatch(at::ScalarType st, F&& run) {
  switch (st) {
    case at::kFloat: run(float{}); break;
    case at::kDouble: run(double{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    default: run(c10::Half{}); break;
  }
}

// x: see check_input; weight, bias: (C,) in param_dtype(x) (float32 for bfloat16/float16 x) or in x's dtype.
// Returns (y, mean, biased var, rstd): y like x (shape, dtype, layout), the statistics (N, C) float64.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_op(const at::Tensor& x,
                                                                      const std::optional<at::Tensor>& weight,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      double eps, bool channels_last) {
  check_input(x, "x", channels_last);
  const auto [N, C, M] = ncm(x);
  at::Tensor y = at::empty_like(x);  // x is dense: y gets its strides, so its layout
  auto [mean, var, rstd] = stat_tensors(x, N, C);
  const at::Tensor wc = checked_param(weight, "weight", x.scalar_type(), C);
  const at::Tensor bc = checked_param(bias, "bias", x.scalar_type(), C);
  dispatch(x.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    using T = acc_t<S>;
    const T* w = param_ptr<T>(wc);
    const T* b = param_ptr<T>(bc);
    auto f = channels_last ? forward_chans<S> : forward_rows<S>;
    f(x.data_ptr<S>(), y.data_ptr<S>(), w, b, N, C, M, eps, mean.data_ptr<double>(), var.data_ptr<double>(),
      rstd.data_ptr<double>());
  });
  return {y, mean, var, rstd};
}

// g, x: same shape, dtype and layout (see check_input); mean, rstd: (N, C) float64 from forward_op.
// Returns (dx, grad_weight, grad_bias): dx like x; the (C,) sums over N, HW of g * xhat and of g in param_dtype(x).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& g, const at::Tensor& x,
                                                           const at::Tensor& mean, const at::Tensor& rstd,
                                                           const std::optional<at::Tensor>& weight,
                                                           bool channels_last) {
  check_input(g, "grad", channels_last);
  check_input(x, "x", channels_last);
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(), "faststyle_norm: grad and x must match");
  const auto [N, C, M] = ncm(x);
  TORCH_CHECK(mean.scalar_type() == at::kDouble && rstd.scalar_type() == at::kDouble && mean.numel() == N * C &&
                  rstd.numel() == N * C && mean.is_contiguous() && rstd.is_contiguous(),
              "faststyle_norm: mean/rstd must be contiguous (N, C) float64");
  at::Tensor dx = at::empty_like(x);
  auto opts = x.options().dtype(at::kDouble);
  at::Tensor sg = at::empty({N, C}, opts), sgxhat = at::empty({N, C}, opts);
  const at::Tensor wc = checked_param(weight, "weight", x.scalar_type(), C);
  dispatch(x.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    using T = acc_t<S>;
    const T* w = param_ptr<T>(wc);
    auto f = channels_last ? backward_chans<S> : backward_rows<S>;
    f(g.data_ptr<S>(), x.data_ptr<S>(), dx.data_ptr<S>(), mean.data_ptr<double>(), rstd.data_ptr<double>(), w, N, C,
      M, sg.data_ptr<double>(), sgxhat.data_ptr<double>());
  });
  // weight / bias gradients: the per-instance sums added over the batch in double, returned in the weight's dtype
  // (param_dtype: float32 for 16-bit inputs)
  at::Tensor gw = at::empty({C}, opts), gb = at::empty({C}, opts);
  const double* psg = sg.data_ptr<double>();
  const double* psx = sgxhat.data_ptr<double>();
  double* pgw = gw.data_ptr<double>();
  double* pgb = gb.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    double w_acc = 0.0, b_acc = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      w_acc += psx[n * C + c];
      b_acc += psg[n * C + c];
    }
    pgw[c] = w_acc;
    pgb[c] = b_acc;
  }
  return {dx, gw.to(param_dtype(x.scalar_type())), gb.to(param_dtype(x.scalar_type()))};
}

// ------------------------------------------------- fused norm -> store (forward_store) ------------------------------
// The network's memory-bound chain after a convolution in one sweep: instance norm, then ReLU or a residual add,
// written straight into the buffer the next convolution reads: nearest-upsampled by `up`, reflection-padded by `pad`
// and, in the channels-last layout, optionally rearranged into `block` x `block` space-to-depth cells. Each of those
// steps is otherwise a pass that reads and writes the whole activation again.
//
// Output geometry: the source (H, W) is upsampled to (up * H, up * W) and padded to (Hp, Wp) = (up * H + 2 pad,
// up * W + 2 pad); output row q reads source row src(q) = reflect(q - pad) / up (columns alike), so each source row is
// normalised once and copied to every output row that reads it. With block > 1 (channels-last only) the output is
// (N, Hp / block, Wp / block, block * block * C): padded pixel (py, px) lands in cell (py / block, px / block) at
// channel ((py % block) * block + px % block) * C + c.
//
// A window (the tiled executor's strips): the source rows given are rows [src0, src0 + H) of an image of full_h rows,
// and the output is the padded rows [q0, q1) of that image's geometry, so Hp = q1 - q0 rows; every padded row of the
// window must read a source row that was given.
struct StoreGeometry {
  int64_t H, W, up, pad, block, Hp, Wp;
  std::vector<int64_t> col_src;                // per output column, the source column
  std::vector<int64_t> col_off;                // per output column, its offset in an output row, in units of C
  std::vector<std::vector<int64_t>> row_dest;  // per source row, the output rows that copy it

  StoreGeometry(int64_t h, int64_t w, int64_t u, int64_t p, int64_t b)
      : StoreGeometry(h, w, u, p, b, h, 0, 0, u * h + 2 * p) {}
  StoreGeometry(int64_t h, int64_t w, int64_t u, int64_t p, int64_t b, int64_t full_h, int64_t src0, int64_t q0,
                int64_t q1)
      : H(h), W(w), up(u), pad(p), block(b), Hp(q1 - q0), Wp(u * w + 2 * p), col_src(Wp), col_off(Wp), row_dest(h) {
    for (int64_t q = 0; q < Wp; ++q) col_src[q] = reflect(q - pad, up * W) / up;
    for (int64_t q = 0; q < Wp; ++q) col_off[q] = block == 1 ? q : (q / block) * block * block + q % block;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t y = reflect(q - pad, up * full_h) / up - src0;
      TORCH_CHECK(y >= 0 && y < h, "faststyle_norm: padded row ", q, " reads source row ", y + src0,
                  ", outside the rows given");
      row_dest[y].push_back(q - q0);
    }
  }
  static int64_t reflect(int64_t i, int64_t n) {
    if (i < 0) i = -i;
    return i >= n ? 2 * (n - 1) - i : i;
  }
  // Offset (in values) of padded pixel (py, px) of image n in a channels-last output of C channels; the offset of
  // (py, px) is that of (py, 0) plus col_off[px] * C.
  int64_t cl_offset(int64_t n, int64_t py, int64_t px, int64_t C) const {
    if (block == 1) return ((n * Hp + py) * Wp + px) * C;
    const int64_t hq = Hp / block, wq = Wp / block;
    const int64_t cell = (n * hq + py / block) * wq + px / block;
    return (cell * block * block + (py % block) * block + px % block) * C;
  }
};

// Residual input: x's shape, any strides (an interior view of the previous padded buffer is the usual case).
template <typename S>
struct Residual {
  const S* p = nullptr;
  int64_t sn = 0, sc = 0, sh = 0, sw = 0;
};

// The store ops' residual argument: absent (false), or checked to match x's shape and dtype on the CPU (true).
bool residual_given(const std::optional<at::Tensor>& residual, const at::Tensor& x, const char* op) {
  const bool given = residual.has_value() && residual->defined();
  TORCH_CHECK(!given || (residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                         residual->device().is_cpu()),
              "faststyle_norm.", op, ": residual must match x's shape and dtype");
  return given;
}

// A residual_given tensor as the kernels read it (its data and strides; empty when there is none).
template <typename S>
Residual<S> residual_view(const std::optional<at::Tensor>& residual, bool given) {
  if (!given) return {};
  return {residual->data_ptr<S>(), residual->stride(0), residual->stride(1), residual->stride(2), residual->stride(3)};
}

// v[i] = (x[i] - mf) * sc + sh, plus res[i * res_step] when there is a residual, then the ReLU when asked, for i in
// [0, count), in the compute type T. The coefficients are per value (channels-last: they change with the channel)
// when kPerValue, else the scalars mf[0], sc[0], sh[0]. One loop per case, so that each vectorises.
template <bool kPerValue, typename X, typename R, typename T>
inline void finish(const X* x, T* v, int64_t count, const T* mf, const T* sc, const T* sh, bool relu, const R* res,
                   int64_t res_step) {
  const auto load = [](const auto* p) -> T {
    if constexpr (std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(p)>>, c10::BFloat16>) {
      return to_float(*p);
    } else {
      return T(*p);
    }
  };
  const auto k = [](const T* a, int64_t i) -> T {
    if constexpr (kPerValue) {
      return a[i];
    } else {
      (void)i;
      return a[0];
    }
  };
  if (res != nullptr) {
    for (int64_t i = 0; i < count; ++i) {
      const T y = (load(x + i) - k(mf, i)) * k(sc, i) + k(sh, i) + load(res + i * res_step);
      v[i] = relu && !(y > T(0)) ? T(0) : y;
    }
  } else if (relu) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) {
      const T y = (load(x + i) - k(mf, i)) * k(sc, i) + k(sh, i);
      v[i] = y > T(0) ? y : T(0);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) v[i] = (load(x + i) - k(mf, i)) * k(sc, i) + k(sh, i);
  }
}

// Rows (NCHW) layout: one parallel task per (n, c) plane; its statistics are taken as forward_rows takes them, then
// each source row is finished once (straight into its first output row when nothing is upsampled) and copied to the
// other output rows that read it. Long on purpose (as forward_rows).
template <typename S, typename T = acc_t<S>>
void store_rows(const S* x, S* out, const T* w, const T* b, int64_t N, int64_t C, const StoreGeometry& g, double eps,
                bool relu, const Residual<S>& res, double* mean, double* var, double* rstd) {
  const int64_t M = g.H * g.W, W = g.W;
  const int64_t grain = std::max<int64_t>(1, kBlock / std::max<int64_t>(M, 1));
  const bool whole = M <= kRowBuf;
  at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) {
    std::unique_ptr<float[]> buf;
    if constexpr (kNarrow<S>) buf = row_buffer(M, whole);
    std::vector<T> line(W);
    std::vector<S> source(W);  // the finished source row, when it is upsampled
    for (int64_t r = r0; r < r1; ++r) {
      const S* xr = x + r * M;
      Stat s;
      if constexpr (kNarrow<S>) {
        s = row_stats_narrow(xr, M, buf.get(), whole);
      } else {
        s = row_stats(xr, M);
      }
      const int64_t n = r / C, c = r % C;
      const auto [mf, sc, sh] = normalisation(s, M, eps, w, b, c, r, mean, var, rstd);
      S* plane = out + r * g.Hp * g.Wp;
      for (int64_t y = 0; y < g.H; ++y) {
        const std::vector<int64_t>& dests = g.row_dest[y];
        S* first = plane + dests[0] * g.Wp;
        S* values = g.up == 1 ? first + g.pad : source.data();
        const S* rrow = res.p ? res.p + n * res.sn + c * res.sc + y * res.sh : nullptr;
        if constexpr (kNarrow<S>) {
          // from the widened row when it was kept whole, else widened again here
          const float* src = buf.get() + y * W;
          if (!whole) {
            widen(xr + y * W, line.data(), W);
            src = line.data();
          }
          finish<false>(src, line.data(), W, &mf, &sc, &sh, relu, rrow, res.sw);
          narrow(line.data(), values, W);
        } else {
          finish<false>(xr + y * W, values, W, &mf, &sc, &sh, relu, rrow, res.sw);
        }
        if (g.up == 1) {
          for (int64_t px = 0; px < g.pad; ++px) first[px] = values[g.col_src[px]];
          for (int64_t px = g.pad + W; px < g.Wp; ++px) first[px] = values[g.col_src[px]];
        } else {
          for (int64_t px = 0; px < g.Wp; ++px) first[px] = values[g.col_src[px]];
        }
        for (size_t k = 1; k < dests.size(); ++k) std::memcpy(plane + dests[k] * g.Wp, first, g.Wp * sizeof(S));
      }
    }
  });
}

// Channels-last layout: the statistics sweep of forward_chans, then one parallel task per (n, source row): the row's
// W * C values are finished once (straight into their first output row when nothing is upsampled or rearranged) and
// copied, C at a time, to every output pixel that reads them. Long on purpose (as forward_chans).
// With `given` (the window op) the coefficients (mf, sc, sh: C values each, the same for every n) are taken as given
// instead of from the statistics of x.
template <typename S, typename T = acc_t<S>>
void store_chans(const S* x, S* out, const T* w, const T* b, int64_t N, int64_t C, const StoreGeometry& g, double eps,
                 bool relu, const Residual<S>& res, double* mean, double* var, double* rstd,
                 const Affine<const T*>* given = nullptr) {
  const int64_t W = g.W, M = g.H * g.W;
  std::vector<T> mf(N * C), sc(N * C), sh(N * C);
  if (given == nullptr) {
    chans_stats(x, w, b, N, C, M, eps, mean, var, rstd, mf.data(), sc.data(), sh.data());
  } else {
    for (int64_t r = 0; r < N * C; ++r) {
      mf[r] = given->mf[r % C];
      sc[r] = given->sc[r % C];
      sh[r] = given->sh[r % C];
    }
  }
  const bool direct = g.up == 1 && g.block == 1;
  const int64_t bytes = C * int64_t(sizeof(S));
  at::parallel_for(0, N * g.H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> line(kNarrow<S> ? W * C : 0);
    std::vector<S> source(direct ? 0 : W * C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / g.H, y = t % g.H;
      const std::vector<int64_t>& dests = g.row_dest[y];
      if (dests.empty()) continue;  // a window's source row that only reflection would read, and none does
      const S* xr = x + (n * M + y * W) * C;
      S* values = direct ? out + g.cl_offset(n, dests[0], g.pad, C) : source.data();
      T* target;
      if constexpr (kNarrow<S>) {
        target = line.data();
      } else {
        target = values;
      }
      for (int64_t m = 0; m < W; ++m) {
        const S* rm = res.p ? res.p + n * res.sn + y * res.sh + m * res.sw : nullptr;
        finish<true>(xr + m * C, target + m * C, C, mf.data() + n * C, sc.data() + n * C, sh.data() + n * C, relu,
                     rm, res.sc);
      }
      if constexpr (kNarrow<S>) narrow(line.data(), values, W * C);
      if (direct) {
        S* first = out + g.cl_offset(n, dests[0], 0, C);
        for (int64_t px = 0; px < g.pad; ++px) std::memcpy(first + px * C, values + g.col_src[px] * C, bytes);
        for (int64_t px = g.pad + W; px < g.Wp; ++px) std::memcpy(first + px * C, values + g.col_src[px] * C, bytes);
        for (size_t k = 1; k < dests.size(); ++k)
          std::memcpy(out + g.cl_offset(n, dests[k], 0, C), first, g.Wp * bytes);
        continue;
      }
      for (const int64_t q : dests) {
        S* row = out + g.cl_offset(n, q, 0, C);
        for (int64_t px = 0; px < g.Wp; ++px) std::memcpy(row + g.col_off[px] * C, values + g.col_src[px] * C, bytes);
      }
    }
  });
}

// x: (N, C, H, W) in the layout channels_last names (see check_input); weight, bias as for forward_op; residual:
// absent, or x's shape and dtype with any strides. Returns (out, mean, biased var, rstd): out in x's layout, of shape
// (N, C, up * H + 2 pad, up * W + 2 pad), or with block > 1 (channels-last only) (N, block^2 C, Hp / block,
// Wp / block) in the channel order of StoreGeometry; the statistics as forward_op's.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> store_op(const at::Tensor& x,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    const std::optional<at::Tensor>& bias, double eps,
                                                                    bool channels_last, bool relu,
                                                                    const std::optional<at::Tensor>& residual,
                                                                    int64_t up, int64_t pad, int64_t block) {
  check_input(x, "x", channels_last);
  TORCH_CHECK(x.dim() == 4, "faststyle_norm.store: x must be (N, C, H, W)");
  TORCH_CHECK(up == 1 || up == 2, "faststyle_norm.store: up must be 1 or 2");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(pad >= 0 && pad < up * H && pad < up * W, "faststyle_norm.store: pad must be in [0, the side)");
  TORCH_CHECK(block >= 1 && (block == 1 || channels_last), "faststyle_norm.store: block > 1 needs channels-last");
  const StoreGeometry g(H, W, up, pad, block);
  TORCH_CHECK(g.Hp % block == 0 && g.Wp % block == 0, "faststyle_norm.store: the padded sides must divide by block");
  at::Tensor out;
  if (block == 1) {
    out = at::empty({N, C, g.Hp, g.Wp}, x.options(),
                    channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  } else {
    out = at::empty({N, block * block * C, g.Hp / block, g.Wp / block}, x.options(), at::MemoryFormat::ChannelsLast);
  }
  const bool has_residual = residual_given(residual, x, "store");
  auto [mean, var, rstd] = stat_tensors(x, N, C);
  const at::Tensor wc = checked_param(weight, "weight", x.scalar_type(), C);
  const at::Tensor bc = checked_param(bias, "bias", x.scalar_type(), C);
  dispatch(x.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    using T = acc_t<S>;
    const T* w = param_ptr<T>(wc);
    const T* b = param_ptr<T>(bc);
    const Residual<S> r = residual_view<S>(residual, has_residual);
    if (channels_last) {
      store_chans<S>(x.data_ptr<S>(), out.data_ptr<S>(), w, b, N, C, g, eps, relu, r, mean.data_ptr<double>(),
                     var.data_ptr<double>(), rstd.data_ptr<double>());
    } else {
      store_rows<S>(x.data_ptr<S>(), out.data_ptr<S>(), w, b, N, C, g, eps, relu, r, mean.data_ptr<double>(),
                    var.data_ptr<double>(), rstd.data_ptr<double>());
    }
  });
  return {out, mean, var, rstd};
}


// The tiled executor's strip of store_op (channels-last only): x (N, C, h, W) holds rows [src_row0, src_row0 + h) of
// an activation of full_h rows; the output is the padded rows [out_row0, out_row1) of the store's geometry for that
// activation (in cells when block > 1: out_row0 and the row count must divide by block). The normalisation is given,
// y = (x - mf) * sc + sh per channel (mf, sc, sh: C float64 values, from statistics of the whole activation), as are
// the ReLU and the residual (x's shape and dtype, any strides).
at::Tensor window_op(const at::Tensor& x, const at::Tensor& mf, const at::Tensor& sc, const at::Tensor& sh, bool relu,
                     const std::optional<at::Tensor>& residual, int64_t up, int64_t pad, int64_t block, int64_t full_h,
                     int64_t src_row0, int64_t out_row0, int64_t out_row1) {
  check_input(x, "x", true);
  TORCH_CHECK(x.dim() == 4, "faststyle_norm.window: x must be (N, C, h, W)");
  TORCH_CHECK(up == 1 || up == 2, "faststyle_norm.window: up must be 1 or 2");
  const int64_t N = x.size(0), C = x.size(1), h = x.size(2), W = x.size(3);
  TORCH_CHECK(pad >= 0 && pad < up * full_h && pad < up * W, "faststyle_norm.window: pad must be in [0, the side)");
  TORCH_CHECK(src_row0 >= 0 && src_row0 + h <= full_h && 0 <= out_row0 && out_row0 < out_row1 &&
                  out_row1 <= up * full_h + 2 * pad,
              "faststyle_norm.window: the rows lie outside the activation");
  TORCH_CHECK(block >= 1 && out_row0 % block == 0 && (out_row1 - out_row0) % block == 0 && (up * W + 2 * pad) % block == 0,
              "faststyle_norm.window: the window's rows and the padded width must divide by block");
  for (const at::Tensor* t : {&mf, &sc, &sh}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kDouble && t->numel() == C,
                "faststyle_norm.window: mf, sc, sh must be ", C, " float64 values on the CPU");
  }
  const StoreGeometry g(h, W, up, pad, block, full_h, src_row0, out_row0, out_row1);
  const at::Tensor out = at::empty({N, block * block * C, g.Hp / block, g.Wp / block}, x.options(),
                                   at::MemoryFormat::ChannelsLast);
  const bool has_residual = residual_given(residual, x, "window");
  dispatch(x.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    using T = acc_t<S>;
    std::vector<T> k(3 * C);
    const at::Tensor parts[3] = {mf.contiguous(), sc.contiguous(), sh.contiguous()};
    for (int64_t i = 0; i < 3; ++i) {
      const double* p = parts[i].data_ptr<double>();
      for (int64_t c = 0; c < C; ++c) k[i * C + c] = T(p[c]);
    }
    const Affine<const T*> given{k.data(), k.data() + C, k.data() + 2 * C};
    const Residual<S> r = residual_view<S>(residual, has_residual);
    store_chans<S>(x.data_ptr<S>(), out.data_ptr<S>(), static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                   N, C, g, 0.0, relu, r, nullptr, nullptr, nullptr, &given);
  });
  return out;
}

// Per (n, c) mean and biased variance (float64) of a channels-last x: the statistics the forward ops take, for the
// tiled executor, which merges them strip by strip.
std::tuple<at::Tensor, at::Tensor> moments_op(const at::Tensor& x) {
  check_input(x, "x", true);
  const auto [N, C, M] = ncm(x);
  auto [mean, var, rstd] = stat_tensors(x, N, C);
  dispatch(x.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    using T = acc_t<S>;
    std::vector<T> mf(N * C), sc(N * C), sh(N * C);
    chans_stats<S>(x.data_ptr<S>(), static_cast<const T*>(nullptr), static_cast<const T*>(nullptr), N, C, M, /*eps, for the unused rstd*/ 1.0, mean.data_ptr<double>(), var.data_ptr<double>(),
                   rstd.data_ptr<double>(), mf.data(), sc.data(), sh.data());
  });
  return {mean, var};
}

// ---------------------------------------------- the store's backward (store_backward) -----------------------------
// The gradient of the stored buffer gathered back to the source pixels: every output pixel that copied source pixel
// (y, x) adds its gradient to it (the adjoint of the copies: padding, upsampling, cells), then the ReLU's mask, read
// from the stored output (positive exactly where the norm's output was). The result is the gradient of the norm's
// output (and of the residual); backward_op turns it into dx.

// Adds the output row `row` (Wp pixels of C values at col_off[px] * C) into acc (W source pixels of C values).
template <typename S, typename T>
inline void gather_row(const S* row, T* acc, int64_t C, const StoreGeometry& g) {
  const auto load = [](S v) -> T {
    if constexpr (kNarrow<S>) {
      return to_float(v);
    } else {
      return T(v);
    }
  };
  if (g.up == 1 && g.block == 1) {  // the interior is the source row itself
    const S* inner = row + g.pad * C;
#pragma omp simd
    for (int64_t i = 0; i < g.W * C; ++i) acc[i] += load(inner[i]);
    for (int64_t px = 0; px < g.Wp; ++px) {
      if (px >= g.pad && px < g.pad + g.W) continue;
      const S* s = row + px * C;
      T* a = acc + g.col_src[px] * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) a[c] += load(s[c]);
    }
    return;
  }
  for (int64_t px = 0; px < g.Wp; ++px) {
    const S* s = row + g.col_off[px] * C;
    T* a = acc + g.col_src[px] * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) a[c] += load(s[c]);
  }
}

// Zeroes acc where the stored output `orow` (the first output row of the source row) is not positive, then writes
// acc (W * C values) to dst in S.
template <typename S, typename T>
inline void mask_and_write(T* acc, const S* orow, S* dst, int64_t C, const StoreGeometry& g, bool relu) {
  if (relu) {
    for (int64_t x = 0; x < g.W; ++x) {
      const S* o = orow + g.col_off[g.pad + g.up * x] * C;
      T* a = acc + x * C;
      for (int64_t c = 0; c < C; ++c) {
        if (!(o[c] > S(0))) a[c] = T(0);
      }
    }
  }
  if constexpr (kNarrow<S>) {
    narrow(acc, dst, g.W * C);
  } else {
    std::memcpy(dst, acc, g.W * C * sizeof(S));
  }
}

// grad, out: the stored buffer's gradient and value (the store's output layout); returns the gradient of the norm's
// output, (N, C, H, W) in x's layout. Rows: one task per (n, c) plane (C = 1 within it); chans: one per (n, row).
template <typename S, typename T = acc_t<S>>
void gather_grad(const S* grad, const S* out, S* g, int64_t N, int64_t C, const StoreGeometry& geo, bool relu,
                 bool channels_last) {
  const int64_t W = geo.W, M = geo.H * geo.W;
  if (!channels_last) {
    at::parallel_for(0, N * C, 1, [&](int64_t r0, int64_t r1) {
      std::vector<T> acc(W);
      for (int64_t r = r0; r < r1; ++r) {
        const S* plane = grad + r * geo.Hp * geo.Wp;
        const S* oplane = out + r * geo.Hp * geo.Wp;
        for (int64_t y = 0; y < geo.H; ++y) {
          std::fill(acc.begin(), acc.end(), T(0));
          for (const int64_t q : geo.row_dest[y]) gather_row(plane + q * geo.Wp, acc.data(), 1, geo);
          mask_and_write(acc.data(), oplane + geo.row_dest[y][0] * geo.Wp, g + r * M + y * W, 1, geo, relu);
        }
      }
    });
    return;
  }
  at::parallel_for(0, N * geo.H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> acc(W * C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / geo.H, y = t % geo.H;
      std::fill(acc.begin(), acc.end(), T(0));
      for (const int64_t q : geo.row_dest[y]) gather_row(grad + geo.cl_offset(n, q, 0, C), acc.data(), C, geo);
      mask_and_write(acc.data(), out + geo.cl_offset(n, geo.row_dest[y][0], 0, C), g + (n * M + y * W) * C, C, geo,
                     relu);
    }
  });
}

// grad: the gradient of store_op's output (its shape and dtype, any layout: made like out); out, x, mean, rstd,
// weight: what store_op was given and returned. Returns (dx, grad_weight, grad_bias, grad of the norm's output),
// the last one also the residual's gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> store_backward_op(
    const at::Tensor& grad, const at::Tensor& out, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool channels_last, bool relu, int64_t up,
    int64_t pad, int64_t block) {
  check_input(x, "x", channels_last);
  TORCH_CHECK(x.dim() == 4, "faststyle_norm.store_backward: x must be (N, C, H, W)");
  const int64_t N = x.size(0), C = x.size(1);
  const StoreGeometry geo(x.size(2), x.size(3), up, pad, block);
  const auto out_format =
      channels_last || block > 1 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(out.sizes() == grad.sizes() && out.scalar_type() == x.scalar_type() && out.is_contiguous(out_format),
              "faststyle_norm.store_backward: out must be store's output");
  const at::Tensor gc = grad.to(x.scalar_type()).contiguous(out_format);
  at::Tensor g = at::empty_like(x);
  dispatch(x.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    gather_grad<S>(gc.data_ptr<S>(), out.data_ptr<S>(), g.data_ptr<S>(), N, C, geo, relu, channels_last);
  });
  auto [dx, gw, gb] = backward_op(g, x, mean, rstd, weight, channels_last);
  return {dx, gw, gb, g};
}

}  // namespace

TORCH_LIBRARY(faststyle_norm, m) {
  m.def("forward(Tensor x, Tensor? weight, Tensor? bias, float eps, bool channels_last)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, bool channels_last)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("store(Tensor x, Tensor? weight, Tensor? bias, float eps, bool channels_last, bool relu, Tensor? residual,"
        " int up, int pad, int block) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("store_backward(Tensor grad, Tensor out, Tensor x, Tensor mean, Tensor rstd, Tensor? weight,"
        " bool channels_last, bool relu, int up, int pad, int block) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("window(Tensor x, Tensor mf, Tensor sc, Tensor sh, bool relu, Tensor? residual, int up, int pad, int block,"
        " int full_h, int src_row0, int out_row0, int out_row1) -> Tensor");
  m.def("moments(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(faststyle_norm, CPU, m) {
  m.impl("forward", forward_op);
  m.impl("backward", backward_op);
  m.impl("store", store_op);
  m.impl("store_backward", store_backward_op);
  m.impl("window", window_op);
  m.impl("moments", moments_op);
}
