// Weight-only int8 and int4 matrix products for decode-sized batches on x86 CPUs.
//
// Activations stay float32: each weight is widened to float32 in registers and multiplied with
// FMA, so the result is the float32 product with the dequantized weight up to summation order.
// One pass streams ROWS weight rows at a time and reuses every activation load across them,
// while prefetching the next tile's rows (one cold start per tile otherwise costs ~40% of the
// bandwidth on SmolLM2's 576-wide rows); output rows are split over torch's OpenMP threads.
// The AVX-512 and AVX2 bodies are compiled side by side with target attributes and chosen at
// run time from CPUID, so one build serves both kinds of machine (and a scalar body any other).
//
// int8: q (N, K) int8, scales (N) float32:             w[n, k] = q[n, k] * scales[n]
// int4: packed (N, Kp/2) uint8, two codes per byte (column 2j in the low nibble of byte j, the
//       portable layout of herd.quantize.int4), scales and zeros (N, Kp/group) float32:
//                                                      w[n, k] = (code - 8) * scale + zero
// The nibble layout is read directly: a chunk of 32 columns is 16 bytes whose low nibbles are
// the even columns and high nibbles the odd ones, so the activations are reordered once per
// call (even columns of each chunk first, then odd) instead of shuffling codes per weight.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

namespace {

constexpr int ROWS = 4;       // weight rows per tile
constexpr int MAX_BATCH = 4;  // activation rows per tile; larger batches run in tiles of 4
constexpr int CHUNK = 32;     // int4 columns per 16-byte chunk
constexpr float INT4_MID = 8.0f;

// HERD_CPU_ISA=avx2|scalar caps the choice (the tests run every body on one machine).
bool allowed(const char* isa) {
  const char* cap = std::getenv("HERD_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return true;
  const std::string order[] = {"scalar", "avx2", "avx512"};
  int want = -1, have = -1;
  for (int i = 0; i < 3; ++i) {
    if (order[i] == cap) want = i;
    if (order[i] == isa) have = i;
  }
  return want < 0 || have <= want;
}

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && allowed("avx512");
  return yes;
}

bool has_avx2() {
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && allowed("avx2");
  return yes;
}

// ------------------------------------------------------------------------------------ int8

template <int M, int R>
__attribute__((target("avx512f,avx512bw"))) void int8_tile_avx512(
    const float* x, int64_t K, const int8_t* q, const float* scales, float* y, int64_t ldy) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
#pragma GCC unroll 4
  for (; k + 16 <= K; k += 16) {
    // The next tile's rows follow this tile's in memory: fetch them at the rate this one
    // is read, so a tile starts on warm lines instead of R cold streams.
    _mm_prefetch(reinterpret_cast<const char*>(q + R * K + k * R), _MM_HINT_T0);
    __m512 w[R];
    for (int r = 0; r < R; ++r)
      w[r] = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * K + k))));
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, w[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = _mm512_reduce_add_ps(acc[m][r]);
      for (int64_t t = k; t < K; ++t) s += x[m * K + t] * static_cast<float>(q[r * K + t]);
      y[m * ldy + r] = s * scales[r];
    }
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int M, int R>
__attribute__((target("avx2,fma"))) void int8_tile_avx2(
    const float* x, int64_t K, const int8_t* q, const float* scales, float* y, int64_t ldy) {
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(q + R * K + k * R), _MM_HINT_T0);
    __m256 w[R];
    for (int r = 0; r < R; ++r)
      w[r] = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + r * K + k))));
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, w[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum256(acc[m][r]);
      for (int64_t t = k; t < K; ++t) s += x[m * K + t] * static_cast<float>(q[r * K + t]);
      y[m * ldy + r] = s * scales[r];
    }
}

template <int M, int R>
void int8_tile_scalar(
    const float* x, int64_t K, const int8_t* q, const float* scales, float* y, int64_t ldy) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = 0.0f;
      for (int64_t t = 0; t < K; ++t) s += x[m * K + t] * static_cast<float>(q[r * K + t]);
      y[m * ldy + r] = s * scales[r];
    }
}

using Int8Tile = void (*)(const float*, int64_t, const int8_t*, const float*, float*, int64_t);

template <int M, int R>
Int8Tile int8_tile() {
  if (has_avx512()) return int8_tile_avx512<M, R>;
  if (has_avx2()) return int8_tile_avx2<M, R>;
  return int8_tile_scalar<M, R>;
}

template <int M>
void int8_batch(const float* x, int64_t K, const int8_t* q, const float* scales, float* y,
                int64_t N) {
  static const Int8Tile full = int8_tile<M, ROWS>();
  static const Int8Tile one = int8_tile<M, 1>();
  // Threads take whole tiles of output rows, each streaming its own part of the weight.
  const int64_t tiles = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    int64_t n = t0 * ROWS;
    const int64_t n1 = std::min(N, t1 * ROWS);
    for (; n + ROWS <= n1; n += ROWS) full(x, K, q + n * K, scales + n, y + n, N);
    for (; n < n1; ++n) one(x, K, q + n * K, scales + n, y + n, N);
  });
}

// ------------------------------------------------------------------------------------ int4

// One activation row reordered for the nibble layout, and its sum per group.
void reorder_for_nibbles(const float* x, int64_t K, int64_t Kp, int64_t group_size, float* xd,
                         float* group_sums) {
  for (int64_t g = 0; g < Kp / group_size; ++g) group_sums[g] = 0.0f;
  for (int64_t c = 0; c < Kp / CHUNK; ++c) {
    float sum = 0.0f;
    for (int j = 0; j < CHUNK / 2; ++j) {
      const int64_t even = c * CHUNK + 2 * j, odd = even + 1;
      const float xe = even < K ? x[even] : 0.0f, xo = odd < K ? x[odd] : 0.0f;
      xd[c * CHUNK + j] = xe;
      xd[c * CHUNK + CHUNK / 2 + j] = xo;
      sum += xe + xo;
    }
    group_sums[c * CHUNK / group_size] += sum;
  }
}

// y[m, r] = sum_c scale[r, g(c)] * (codes . x)[c]  +  sum_g (zero - 8 scale)[r, g] * x_sum[m, g]
// The first sum is the streaming pass (the scale is a broadcast memory operand of one FMA per
// chunk); the second is a short vector pass over the row's scales and zeros afterwards, so the
// streaming loop carries no per-group bookkeeping. Group sizes are powers of two: g(c) is a shift.

template <int M, int R>
__attribute__((target("avx512f,avx512bw"))) void int4_offsets_avx512(
    const float* sums, const float* scales, const float* zeros, int64_t G, float* y,
    int64_t ldy) {
  const __m512 mid = _mm512_set1_ps(INT4_MID);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; g += 16) {
        const __mmask16 live = G - g >= 16 ? 0xFFFF : (1u << (G - g)) - 1;
        const __m512 sc = _mm512_maskz_loadu_ps(live, scales + r * G + g);
        const __m512 z = _mm512_maskz_loadu_ps(live, zeros + r * G + g);
        const __m512 off = _mm512_fnmadd_ps(mid, sc, z);
        acc = _mm512_fmadd_ps(off, _mm512_maskz_loadu_ps(live, sums + m * G + g), acc);
      }
      y[m * ldy + r] += _mm512_reduce_add_ps(acc);
    }
}

template <int M, int R>
__attribute__((target("avx512f,avx512bw"))) void int4_tile_avx512(
    const float* xd, const float* sums, int64_t Kp, const uint8_t* packed, const float* scales,
    const float* zeros, int64_t G, int64_t shift, float* y, int64_t ldy) {
  const int64_t half = Kp / 2, chunks = Kp / CHUNK;
  const __m512i low_mask = _mm512_set1_epi32(0x0F);
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    _mm_prefetch(reinterpret_cast<const char*>(packed + R * half + c * 16 * R), _MM_HINT_T0);
    const int64_t g = c >> shift;
    __m512 lo[R], hi[R];
    for (int r = 0; r < R; ++r) {
      const __m512i v = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + r * half + c * 16)));
      lo[r] = _mm512_cvtepi32_ps(_mm512_and_si512(v, low_mask));
      hi[r] = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
    }
    for (int m = 0; m < M; ++m) {
      const __m512 xe = _mm512_loadu_ps(xd + m * Kp + c * CHUNK);
      const __m512 xo = _mm512_loadu_ps(xd + m * Kp + c * CHUNK + 16);
      for (int r = 0; r < R; ++r) {
        const __m512 p = _mm512_fmadd_ps(hi[r], xo, _mm512_mul_ps(lo[r], xe));
        acc[m][r] = _mm512_fmadd_ps(p, _mm512_set1_ps(scales[r * G + g]), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * ldy + r] = _mm512_reduce_add_ps(acc[m][r]);
  int4_offsets_avx512<M, R>(sums, scales, zeros, G, y, ldy);
}

template <int M, int R>
__attribute__((target("avx2,fma"))) void int4_offsets_avx2(
    const float* sums, const float* scales, const float* zeros, int64_t G, float* y,
    int64_t ldy) {
  const __m256 mid = _mm256_set1_ps(INT4_MID);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      __m256 acc = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= G; g += 8) {
        const __m256 sc = _mm256_loadu_ps(scales + r * G + g);
        const __m256 off = _mm256_fnmadd_ps(mid, sc, _mm256_loadu_ps(zeros + r * G + g));
        acc = _mm256_fmadd_ps(off, _mm256_loadu_ps(sums + m * G + g), acc);
      }
      float total = hsum256(acc);
      for (; g < G; ++g)
        total += (zeros[r * G + g] - INT4_MID * scales[r * G + g]) * sums[m * G + g];
      y[m * ldy + r] += total;
    }
}

template <int M, int R>
__attribute__((target("avx2,fma"))) void int4_tile_avx2(
    const float* xd, const float* sums, int64_t Kp, const uint8_t* packed, const float* scales,
    const float* zeros, int64_t G, int64_t shift, float* y, int64_t ldy) {
  const int64_t half = Kp / 2;
  const __m256i low_mask = _mm256_set1_epi32(0x0F);
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  // Half-chunks of 8 bytes: bytes b..b+7 hold columns 2j (low) and 2j+1 (high), j = b..b+7.
  for (int64_t h = 0; h < half / 8; ++h) {
    _mm_prefetch(reinterpret_cast<const char*>(packed + R * half + h * 8 * R), _MM_HINT_T0);
    const int64_t c = h / 2, b = (h % 2) * 8, g = c >> shift;
    __m256 lo[R], hi[R];
    for (int r = 0; r < R; ++r) {
      const __m256i v = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + r * half + h * 8)));
      lo[r] = _mm256_cvtepi32_ps(_mm256_and_si256(v, low_mask));
      hi[r] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
    }
    for (int m = 0; m < M; ++m) {
      const __m256 xe = _mm256_loadu_ps(xd + m * Kp + c * CHUNK + b);
      const __m256 xo = _mm256_loadu_ps(xd + m * Kp + c * CHUNK + 16 + b);
      for (int r = 0; r < R; ++r) {
        const __m256 p = _mm256_fmadd_ps(hi[r], xo, _mm256_mul_ps(lo[r], xe));
        acc[m][r] = _mm256_fmadd_ps(p, _mm256_set1_ps(scales[r * G + g]), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * ldy + r] = hsum256(acc[m][r]);
  int4_offsets_avx2<M, R>(sums, scales, zeros, G, y, ldy);
}

template <int M, int R>
void int4_tile_scalar(const float* xd, const float* sums, int64_t Kp, const uint8_t* packed,
                      const float* scales, const float* zeros, int64_t G, int64_t shift,
                      float* y, int64_t ldy) {
  const int64_t per_group = int64_t{1} << shift;
  const int64_t half = Kp / 2;
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float total = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        float dot = 0.0f;
        for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c)
          for (int j = 0; j < 16; ++j) {
            const uint8_t byte = packed[r * half + c * 16 + j];
            dot += static_cast<float>(byte & 0x0F) * xd[m * Kp + c * CHUNK + j] +
                   static_cast<float>(byte >> 4) * xd[m * Kp + c * CHUNK + 16 + j];
          }
        const float s = scales[r * G + g];
        total += s * dot + (zeros[r * G + g] - INT4_MID * s) * sums[m * G + g];
      }
      y[m * ldy + r] = total;
    }
}

using Int4Tile = void (*)(const float*, const float*, int64_t, const uint8_t*, const float*,
                          const float*, int64_t, int64_t, float*, int64_t);

template <int M, int R>
Int4Tile int4_tile() {
  if (has_avx512()) return int4_tile_avx512<M, R>;
  if (has_avx2()) return int4_tile_avx2<M, R>;
  return int4_tile_scalar<M, R>;
}

template <int M>
void int4_batch(const float* xd, const float* sums, int64_t Kp, const uint8_t* packed,
                const float* scales, const float* zeros, int64_t G, int64_t shift, float* y,
                int64_t N) {
  static const Int4Tile full = int4_tile<M, ROWS>();
  static const Int4Tile one = int4_tile<M, 1>();
  const int64_t half = Kp / 2, tiles = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    int64_t n = t0 * ROWS;
    const int64_t n1 = std::min(N, t1 * ROWS);
    for (; n + ROWS <= n1; n += ROWS)
      full(xd, sums, Kp, packed + n * half, scales + n * G, zeros + n * G, G, shift, y + n, N);
    for (; n < n1; ++n)
      one(xd, sums, Kp, packed + n * half, scales + n * G, zeros + n * G, G, shift, y + n, N);
  });
}

// ------------------------------------------------------------------------------------- ops

void check_x(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              op, ": x must be a 2-D float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(1) == K, op, ": x has ", x.size(1), " columns, the weight ", K);
}

at::Tensor int8_mm(const at::Tensor& x_in, const at::Tensor& q_in, const at::Tensor& s_in) {
  TORCH_CHECK(q_in.scalar_type() == at::kChar && q_in.dim() == 2,
              "int8_mm: weight must be 2-D int8, got ", q_in.scalar_type());
  const int64_t N = q_in.size(0), K = q_in.size(1);
  check_x(x_in, K, "int8_mm");
  TORCH_CHECK(s_in.scalar_type() == at::kFloat && s_in.numel() == N,
              "int8_mm: scales must be float32 with one value per output row (", N, ")");
  const at::Tensor x = x_in.contiguous(), q = q_in.contiguous(), s = s_in.contiguous();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  for (int64_t m = 0; m < M; m += MAX_BATCH) {
    const float* xm = xp + m * K;
    float* ym = yp + m * N;
    switch (std::min<int64_t>(MAX_BATCH, M - m)) {
      case 1: int8_batch<1>(xm, K, qp, sp, ym, N); break;
      case 2: int8_batch<2>(xm, K, qp, sp, ym, N); break;
      case 3: int8_batch<3>(xm, K, qp, sp, ym, N); break;
      default: int8_batch<4>(xm, K, qp, sp, ym, N); break;
    }
  }
  return y;
}

at::Tensor int4_mm(const at::Tensor& x_in, const at::Tensor& p_in, const at::Tensor& s_in,
                   const at::Tensor& z_in, int64_t group_size) {
  TORCH_CHECK(group_size >= CHUNK && (group_size & (group_size - 1)) == 0,
              "int4_mm: group_size must be a power of two from 32, got ", group_size);
  TORCH_CHECK(p_in.scalar_type() == at::kByte && p_in.dim() == 2,
              "int4_mm: packed weight must be 2-D uint8, got ", p_in.scalar_type());
  const int64_t N = p_in.size(0), Kp = 2 * p_in.size(1), G = Kp / group_size;
  TORCH_CHECK(Kp % group_size == 0, "int4_mm: packed width ", Kp, " is not whole groups");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) <= Kp && x_in.size(1) > Kp - group_size,
              "int4_mm: x has ", x_in.size(1), " columns, the weight holds ", Kp, " padded");
  check_x(x_in, x_in.size(1), "int4_mm");
  for (const at::Tensor* t : {&s_in, &z_in})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == N &&
                    t->size(1) == G,
                "int4_mm: scales and zeros must be float32 (", N, ", ", G, ")");
  const at::Tensor x = x_in.contiguous(), p = p_in.contiguous();
  const at::Tensor s = s_in.contiguous(), z = z_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<float> xd(MAX_BATCH * Kp), sums(MAX_BATCH * G);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; m += MAX_BATCH) {
    const int64_t rows = std::min<int64_t>(MAX_BATCH, M - m);
    for (int64_t i = 0; i < rows; ++i)
      reorder_for_nibbles(xp + (m + i) * K, K, Kp, group_size, xd.data() + i * Kp,
                          sums.data() + i * G);
    const auto args = std::make_tuple(xd.data(), sums.data(), Kp, p.data_ptr<uint8_t>(),
                                      s.data_ptr<float>(), z.data_ptr<float>(), G,
                                      int64_t{__builtin_ctzll(group_size / CHUNK)}, yp + m * N, N);
    switch (rows) {
      case 1: std::apply(int4_batch<1>, args); break;
      case 2: std::apply(int4_batch<2>, args); break;
      case 3: std::apply(int4_batch<3>, args); break;
      default: std::apply(int4_batch<4>, args); break;
    }
  }
  return y;
}

std::string isa() { return has_avx512() ? "avx512" : has_avx2() ? "avx2" : "scalar"; }

}  // namespace

TORCH_LIBRARY(herd_cpu, m) {
  m.def("int8_mm(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
}
