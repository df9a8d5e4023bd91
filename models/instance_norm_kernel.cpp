// Fused CPU kernels for models/norm.py's InstanceNorm (float32 and float64), compiled on first use by
// torch.utils.cpp_extension.load and registered as torch.ops.faststyle_norm.{forward,backward}.
//
// Memory layouts (the Python side passes 3-D contiguous views, see models/norm.py `_to_3d`):
//   rows  (NCHW):          x is (N, C, M), one row of M spatial positions per (n, c); rows run in parallel and each
//                          row is read for its statistics and then again for the output while it is still in cache.
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
// Backward: with S = sum(g * (x - mean)), sg = sum(g), a = gamma * rstd (Ioffe & Szegedy 2015, per instance):
//           dx = a * g - a * sg / M - a * rstd^2 * S / M * (x - mean).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FASTSTYLE_STREAM 1
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

template <typename T>
void forward_rows(const T* x, T* y, const T* w, const T* b, int64_t N, int64_t C, int64_t M, double eps,
                  double* mean, double* var, double* rstd) {
  const int64_t grain = std::max<int64_t>(1, kBlock / std::max<int64_t>(M, 1));
  [[maybe_unused]] const bool stream = use_stream<T>(N * C * M);
  at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * M;
      T* yr = y + r * M;
      const Stat s = row_stats(xr, M);
      const double v = s.m2 / double(M);
      const double rs = 1.0 / std::sqrt(v + eps);
      const int64_t c = r % C;
      const double scale = rs * (w ? double(w[c]) : 1.0);
      const T mf = T(s.mean);
      const T sc = T(scale);
      const T sh = T((b ? double(b[c]) : 0.0) + scale * (double(mf) - s.mean));
      mean[r] = s.mean;
      var[r] = v;
      rstd[r] = rs;
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
#ifdef FASTSTYLE_STREAM
    if (stream) _mm_sfence();
#endif
  });
}

template <typename T>
void backward_rows(const T* g, const T* x, T* dx, const double* mean, const double* rstd, const T* w, int64_t N,
                   int64_t C, int64_t M, double* sg_out, double* sgxhat_out) {
  const int64_t grain = std::max<int64_t>(1, kBlock / std::max<int64_t>(M, 1));
  [[maybe_unused]] const bool stream = use_stream<T>(N * C * M);
  at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* gr = g + r * M;
      const T* xr = x + r * M;
      T* dr = dx + r * M;
      const T mf = T(mean[r]);
      double sg = 0.0, sgx = 0.0;
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
      const double rs = rstd[r];
      const double S = sgx + sg * (double(mf) - mean[r]);  // sum(g * (x - mean))
      const double a = rs * (w ? double(w[r % C]) : 1.0);
      const double c1 = -a * rs * rs * S / double(M);
      const double c0 = -a * sg / double(M) + c1 * (double(mf) - mean[r]);
      const T ta = T(a), tc1 = T(c1), tc0 = T(c0);
      sg_out[r] = sg;
      sgxhat_out[r] = S * rs;
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
#ifdef FASTSTYLE_STREAM
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: make them visible before the region ends
#endif
  });
}

// ---------------------------------------------------------- channels-last (N, M, C) -------------------------------
// Positions per parallel task and per statistics chunk.
inline int64_t block_positions(int64_t C) { return std::max<int64_t>(1, kBlock / C); }
inline int64_t chunk_positions(int64_t C) { return std::max<int64_t>(1, kChunk / C); }

template <typename T>
void forward_chans(const T* x, T* y, const T* w, const T* b, int64_t N, int64_t C, int64_t M, double eps,
                   double* mean, double* var, double* rstd) {
  const int64_t P = block_positions(C), Q = chunk_positions(C);
  const int64_t nb = (M + P - 1) / P;
  // per (n, block, c) partial statistics
  std::vector<double> pn(N * nb * C), pm(N * nb * C), pq(N * nb * C);
  at::parallel_for(0, N * nb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> sum(C), cm(C), sd(C), sq(C);
    std::vector<Stat> st(C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nb, blk = t % nb;
      const int64_t m0 = blk * P, m1 = std::min(M, m0 + P);
      std::fill(st.begin(), st.end(), Stat{});
      for (int64_t q0 = m0; q0 < m1; q0 += Q) {
        const int64_t q1 = std::min(m1, q0 + Q);
        const T* xb = x + (n * M) * C;
        std::fill(sum.begin(), sum.end(), T(0));
        for (int64_t m = q0; m < q1; ++m) {
          const T* xm = xb + m * C;
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
        for (int64_t m = q0; m < q1; ++m) {
          const T* xm = xb + m * C;
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
  std::vector<T> mf(N * C), sc(N * C), sh(N * C);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      Stat s;
      for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t k = (n * nb + blk) * C + c;
        s.merge(pn[k], pm[k], pq[k]);
      }
      const int64_t r = n * C + c;
      const double v = s.m2 / double(M);
      const double rs = 1.0 / std::sqrt(v + eps);
      const double scale = rs * (w ? double(w[c]) : 1.0);
      mf[r] = T(s.mean);
      sc[r] = T(scale);
      sh[r] = T((b ? double(b[c]) : 0.0) + scale * (double(mf[r]) - s.mean));
      mean[r] = s.mean;
      var[r] = v;
      rstd[r] = rs;
    }
  }
  at::parallel_for(0, N * nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nb, blk = t % nb;
      const int64_t m0 = blk * P, m1 = std::min(M, m0 + P);
      const T* mfn = mf.data() + n * C;
      const T* scn = sc.data() + n * C;
      const T* shn = sh.data() + n * C;
      for (int64_t m = m0; m < m1; ++m) {
        const T* xm = x + (n * M + m) * C;
        T* ym = y + (n * M + m) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) ym[c] = (xm[c] - mfn[c]) * scn[c] + shn[c];
      }
    }
  });
}

template <typename T>
void backward_chans(const T* g, const T* x, T* dx, const double* mean, const double* rstd, const T* w, int64_t N,
                    int64_t C, int64_t M, double* sg_out, double* sgxhat_out) {
  const int64_t P = block_positions(C), Q = chunk_positions(C);
  const int64_t nb = (M + P - 1) / P;
  std::vector<T> mf(N * C);
  for (int64_t r = 0; r < N * C; ++r) mf[r] = T(mean[r]);
  std::vector<double> p1(N * nb * C), p2(N * nb * C);
  at::parallel_for(0, N * nb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> a1(C), a2(C);
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
        for (int64_t m = q0; m < q1; ++m) {
          const T* gm = g + (n * M + m) * C;
          const T* xm = x + (n * M + m) * C;
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
      const double S = sgx + sg * off;
      const double a = rs * (w ? double(w[c]) : 1.0);
      const double c1 = -a * rs * rs * S / double(M);
      ca[r] = T(a);
      c1v[r] = T(c1);
      c0v[r] = T(-a * sg / double(M) + c1 * off);
      sg_out[r] = sg;
      sgxhat_out[r] = S * rs;
    }
  }
  at::parallel_for(0, N * nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nb, blk = t % nb;
      const int64_t m0 = blk * P, m1 = std::min(M, m0 + P);
      const T* mfn = mf.data() + n * C;
      const T* an = ca.data() + n * C;
      const T* c1n = c1v.data() + n * C;
      const T* c0n = c0v.data() + n * C;
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t off = (n * M + m) * C;
        const T* gm = g + off;
        const T* xm = x + off;
        T* dm = dx + off;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dm[c] = an[c] * gm[c] + c1n[c] * (xm[c] - mfn[c]) + c0n[c];
      }
    }
  });
}

// ------------------------------------------------------------------ op entry points ------------------------------
void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "faststyle_norm: ", name, " must be on the CPU");
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous(), "faststyle_norm: ", name, " must be a contiguous 3-D view");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "faststyle_norm: ", name, " must be float32 or float64");
}

// x: (N, C, M) when channels_last is false, else (N, M, C); y: a tensor of the same shape/dtype written in place.
// Returns (mean, biased var, rstd), each (N, C) float64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias, double eps,
                                                          bool channels_last, at::Tensor y) {
  check_input(x, "x");
  check_input(y, "y");
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(), "faststyle_norm: y must match x");
  const int64_t N = x.size(0);
  const int64_t C = channels_last ? x.size(2) : x.size(1);
  const int64_t M = channels_last ? x.size(1) : x.size(2);
  auto opts = x.options().dtype(at::kDouble);
  at::Tensor mean = at::empty({N, C}, opts), var = at::empty({N, C}, opts), rstd = at::empty({N, C}, opts);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    at::Tensor wc = weight.has_value() ? weight->contiguous() : at::Tensor();
    at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
    const T* w = wc.defined() ? wc.data_ptr<T>() : nullptr;
    const T* b = bc.defined() ? bc.data_ptr<T>() : nullptr;
    auto f = channels_last ? forward_chans<T> : forward_rows<T>;
    f(x.data_ptr<T>(), y.data_ptr<T>(), w, b, N, C, M, eps, mean.data_ptr<double>(), var.data_ptr<double>(),
      rstd.data_ptr<double>());
  };
  if (x.scalar_type() == at::kFloat) run(float{}); else run(double{});
  return {mean, var, rstd};
}

// g, x: same 3-D layout as in forward_op; mean, rstd: (N, C) float64 from forward_op; dx written in place.
// Returns (grad_weight, grad_bias) = (sum over N, HW of g * xhat, of g), each (C,) in x's dtype.
std::tuple<at::Tensor, at::Tensor> backward_op(const at::Tensor& g, const at::Tensor& x, const at::Tensor& mean,
                                               const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                                               bool channels_last, at::Tensor dx) {
  check_input(g, "grad");
  check_input(x, "x");
  check_input(dx, "dx");
  TORCH_CHECK(g.sizes() == x.sizes() && dx.sizes() == x.sizes() && g.scalar_type() == x.scalar_type() &&
                  dx.scalar_type() == x.scalar_type(), "faststyle_norm: grad, x and dx must match");
  const int64_t N = x.size(0);
  const int64_t C = channels_last ? x.size(2) : x.size(1);
  const int64_t M = channels_last ? x.size(1) : x.size(2);
  TORCH_CHECK(mean.scalar_type() == at::kDouble && rstd.scalar_type() == at::kDouble && mean.numel() == N * C &&
                  rstd.numel() == N * C && mean.is_contiguous() && rstd.is_contiguous(),
              "faststyle_norm: mean/rstd must be contiguous (N, C) float64");
  auto opts = x.options().dtype(at::kDouble);
  at::Tensor sg = at::empty({N, C}, opts), sgxhat = at::empty({N, C}, opts);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    at::Tensor wc = weight.has_value() ? weight->contiguous() : at::Tensor();
    const T* w = wc.defined() ? wc.data_ptr<T>() : nullptr;
    auto f = channels_last ? backward_chans<T> : backward_rows<T>;
    f(g.data_ptr<T>(), x.data_ptr<T>(), dx.data_ptr<T>(), mean.data_ptr<double>(), rstd.data_ptr<double>(), w, N, C,
      M, sg.data_ptr<double>(), sgxhat.data_ptr<double>());
  };
  if (x.scalar_type() == at::kFloat) run(float{}); else run(double{});
  // weight / bias gradients: the per-instance sums added over the batch in double, returned in x's dtype
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
  return {gw.to(x.scalar_type()), gb.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY(faststyle_norm, m) {
  m.def("forward(Tensor x, Tensor? weight, Tensor? bias, float eps, bool channels_last, Tensor(a!) y)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, bool channels_last,"
        " Tensor(a!) dx) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(faststyle_norm, CPU, m) {
  m.impl("forward", forward_op);
  m.impl("backward", backward_op);
}
