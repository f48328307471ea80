// float32 matrix products for decode-sized batches: (M, K) activations times an (N, K) weight,
// M up to a few rows. BLAS's GEMM packs and blocks for large M; at one to eight rows a product
// is one pass over the weight, bound by memory bandwidth, and on this project's 2-core EPYC
// torch's float32 mm streams it at a third of the rate this kernel does (benchmarks/kernels.py).
// Each weight tile of ROWS rows is read from memory once, with the next tile prefetched, and
// every block of up to MAX_BATCH activation rows is multiplied with it while it is in L1/L2, so
// eight rows cost little more than one. Sums are float32 FMA chains, 16 (AVX-512) or 8 (AVX2)
// partial sums per output.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "isa.h"
#include "tiles.h"

namespace {

using herd::MAX_BATCH;
using herd::ROWS;

template <int M, int R>
__attribute__((target("avx512f"))) void f32_tile_avx512(const float* x, int64_t K,
                                                        const float* w, float* y, int64_t ldy) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    herd::prefetch_lines_far(w + R * K + k * R, 64 * R);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(w + r * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = _mm512_reduce_add_ps(acc[m][r]);
      for (int64_t t = k; t < K; ++t) s += x[m * K + t] * w[r * K + t];
      y[m * ldy + r] = s;
    }
}

template <int M, int R>
__attribute__((target("avx2,fma"))) void f32_tile_avx2(const float* x, int64_t K, const float* w,
                                                       float* y, int64_t ldy) {
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    herd::prefetch_lines_far(w + R * K + k * R, 32 * R);
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(w + r * K + k);
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = herd::hsum_avx2(acc[m][r]);
      for (int64_t t = k; t < K; ++t) s += x[m * K + t] * w[r * K + t];
      y[m * ldy + r] = s;
    }
}

template <int M, int R>
void f32_tile_scalar(const float* x, int64_t K, const float* w, float* y, int64_t ldy) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = 0.0f;
      for (int64_t t = 0; t < K; ++t) s += x[m * K + t] * w[r * K + t];
      y[m * ldy + r] = s;
    }
}

using F32Tile = void (*)(const float*, int64_t, const float*, float*, int64_t);

template <int M, int R>
F32Tile f32_tile() {
  if (herd::has_avx512()) return f32_tile_avx512<M, R>;
  if (herd::has_avx2()) return f32_tile_avx2<M, R>;
  return f32_tile_scalar<M, R>;
}

// tiles[m - 1][whole]: the tile of m activation rows and ROWS (whole) or 1 weight rows.
struct Tiles {
  F32Tile t[MAX_BATCH][2];
  Tiles()
      : t{{f32_tile<1, 1>(), f32_tile<1, ROWS>()},
          {f32_tile<2, 1>(), f32_tile<2, ROWS>()},
          {f32_tile<3, 1>(), f32_tile<3, ROWS>()},
          {f32_tile<4, 1>(), f32_tile<4, ROWS>()}} {}
};

at::Tensor float_mm(const at::Tensor& x_in, const at::Tensor& w_in) {
  TORCH_CHECK(w_in.device().is_cpu() && w_in.scalar_type() == at::kFloat && w_in.dim() == 2,
              "float_mm: weight must be a 2-D float32 CPU tensor, got ", w_in.scalar_type(), " ",
              w_in.sizes());
  const int64_t N = w_in.size(0), K = w_in.size(1);
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2 &&
                  x_in.size(1) == K,
              "float_mm: x must be a 2-D float32 CPU tensor with ", K, " columns, got ",
              x_in.scalar_type(), " ", x_in.sizes());
  static const Tiles tiles;
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  herd::over_row_tiles(N, [&](int64_t n, bool whole) {
    for (int64_t m = 0; m < M; m += MAX_BATCH) {
      const int64_t rows = std::min<int64_t>(MAX_BATCH, M - m);
      tiles.t[rows - 1][whole](xp + m * K, K, wp + n * K, yp + m * N + n, N);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(herd_cpu, m) { m.def("float_mm(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) { m.impl("float_mm", &float_mm); }
