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

#include "isa.h"
#include "tiles.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <tuple>
#include <vector>

namespace {

using herd::has_avx2;
using herd::has_avx512;
using herd::MAX_BATCH;
using herd::over_row_tiles;
using herd::prefetch_lines;
using herd::prefetch_lines_far;
using herd::ROWS;

constexpr int CHUNK = 32;     // int4 columns per 16-byte chunk
constexpr float INT4_MID = 8.0f;

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
    prefetch_lines_far(q + R * K + k * R, 16 * R);
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

template <int M, int R>
__attribute__((target("avx2,fma"))) void int8_tile_avx2(
    const float* x, int64_t K, const int8_t* q, const float* scales, float* y, int64_t ldy) {
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    prefetch_lines_far(q + R * K + k * R, 8 * R);
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
      float s = herd::hsum_avx2(acc[m][r]);
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
  over_row_tiles(N, [&](int64_t n, bool whole) {
    (whole ? full : one)(x, K, q + n * K, scales + n, y + n, N);
  });
}

// ------------------------------------------------------------------------------ int8 x int8
//
// w8a8's integer products: (M, K) int8 activations times (N, K) int8 weights, exact int32 sums
// (torch._int_mm's result). AVX-512 VNNI's vpdpbusd multiplies unsigned by signed bytes, so
// the weight bytes are offset by 128 (w ^ 0x80 = w + 128 as unsigned) and 128 * sum(x) is
// taken off at the end; AVX2's vpmaddubsw takes |w| and x carrying w's sign, whose pair sums
// stay under 2^15 while |x| <= 127 (the op checks). One 64- or 32-byte step covers as many
// weights as the float kernel's four or eight.

template <int M, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void i8i8_tile_avx512(
    const int8_t* x, const int32_t* xsums, int64_t K, const int8_t* q, int32_t* y, int64_t ldy) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 live = K - k >= 64 ? ~__mmask64{0} : (__mmask64{1} << (K - k)) - 1;
    prefetch_lines_far(q + R * K + k * R, 64 * R);
    __m512i w[R];
    for (int r = 0; r < R; ++r)
      w[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(live, q + r * K + k), flip);
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi8(live, x + m * K + k);  // zero past K
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], w[r], xv);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r)
      y[m * ldy + r] = _mm512_reduce_add_epi32(acc[m][r]) - 128 * xsums[m];
}

template <int M, int R>
__attribute__((target("avx2"))) void i8i8_tile_avx2(const int8_t* x, const int32_t* xsums,
                                                    int64_t K, const int8_t* q, int32_t* y,
                                                    int64_t ldy) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    prefetch_lines_far(q + R * K + k * R, 32 * R);
    __m256i w[R], aw[R];
    for (int r = 0; r < R; ++r) {
      w[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * K + k));
      aw[r] = _mm256_abs_epi8(w[r]);  // -128 reads as 128 unsigned: still exact
    }
    for (int m = 0; m < M; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + k));
      for (int r = 0; r < R; ++r) {
        const __m256i pairs = _mm256_maddubs_epi16(aw[r], _mm256_sign_epi8(xv, w[r]));
        acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      const __m256i a = acc[m][r];
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      int32_t total = _mm_cvtsi128_si32(s);
      for (int64_t t = k; t < K; ++t) total += int32_t{x[m * K + t]} * q[r * K + t];
      y[m * ldy + r] = total;
    }
}

template <int M, int R>
void i8i8_tile_scalar(const int8_t* x, const int32_t*, int64_t K, const int8_t* q, int32_t* y,
                      int64_t ldy) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      int32_t total = 0;
      for (int64_t t = 0; t < K; ++t) total += int32_t{x[m * K + t]} * q[r * K + t];
      y[m * ldy + r] = total;
    }
}

using I8I8Tile = void (*)(const int8_t*, const int32_t*, int64_t, const int8_t*, int32_t*,
                          int64_t);

template <int M, int R>
I8I8Tile i8i8_tile() {
  if (herd::has_avx512_vnni()) return i8i8_tile_avx512<M, R>;
  if (has_avx2()) return i8i8_tile_avx2<M, R>;
  return i8i8_tile_scalar<M, R>;
}

template <int M>
void i8i8_batch(const int8_t* x, const int32_t* xsums, int64_t K, const int8_t* q, int32_t* y,
                int64_t N) {
  static const I8I8Tile full = i8i8_tile<M, ROWS>();
  static const I8I8Tile one = i8i8_tile<M, 1>();
  over_row_tiles(N, [&](int64_t n, bool whole) {
    (whole ? full : one)(x, xsums, K, q + n * K, y + n, N);
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
      float total = herd::hsum_avx2(acc);
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
    for (int r = 0; r < R; ++r) y[m * ldy + r] = herd::hsum_avx2(acc[m][r]);
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
  const int64_t half = Kp / 2;
  over_row_tiles(N, [&](int64_t n, bool whole) {
    (whole ? full : one)(xd, sums, Kp, packed + n * half, scales + n * G, zeros + n * G, G, shift,
                         y + n, N);
  });
}

// ------------------------------------------------------------------------------------ w4a8
//
// The int4 weights times activations quantized to int8 as they arrive, one symmetric scale per
// chunk of 32 inputs (llama.cpp's Q8 blocks): the integer products run as byte dot products
// (AVX-512 VNNI vpdpbusd; AVX2 vpmaddubsw), four bytes per instruction lane instead of one
// float conversion and FMA per weight, which is what bounds the float int4 kernel. The result
// is the float product of the dequantized activations and weights up to summation order:
//   y[m, r] = sum_c scale[r, g(c)] * xs[m, c] * (codes . xq)[c]  +  sum_g (zero - 8 scale)[r, g] * xsum[m, g]
// where g(c) = c >> shift is the chunk's weight group (groups are powers of two from 32) and
// xsum[m, g] the group's sum of dequantized activations.
//
// Activations are laid out per block of four chunks (128 inputs): the 64 even columns (the
// low nibbles of the block's 64 weight bytes), then the 64 odd ones. xs16 repeats each chunk's
// scale over the four 32-bit lanes its products land in.

constexpr int BLOCK = 4 * CHUNK;  // inputs per activation block
constexpr float ROUNDER = 12582912.0f;

struct QuantizedRows {
  std::vector<int8_t> q;   // M x blocks x 128, zero past the row's last chunk
  std::vector<float> xs16;  // M x blocks x 16
  std::vector<float> xsum;  // M x G
  int64_t blocks;
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t C, int64_t shift) {
  QuantizedRows out;
  out.blocks = (C + 3) / 4;
  const int64_t G = C >> shift;
  out.q.assign(M * out.blocks * BLOCK, 0);
  out.xs16.assign(M * out.blocks * 16, 0.0f);
  out.xsum.assign(M * G, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < C; ++c) {
      const float* xc = x + m * K + c * CHUNK;
      const int64_t width = std::clamp<int64_t>(K - c * CHUNK, 0, CHUNK);
      float amax = 0.0f;
      for (int64_t j = 0; j < width; ++j) amax = std::max(amax, std::fabs(xc[j]));
      // The same float32 operations as herd.quantize.int4.quantize_activations.
      const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int8_t* block = out.q.data() + (m * out.blocks + c / 4) * BLOCK + (c % 4) * 16;
      int32_t total = 0;
      for (int64_t j = 0; j < width; ++j) {
        // Round half to even as torch.round does, without a libm call per value: adding and
        // subtracting 1.5 * 2^23 leaves the nearest integer (|x * inv| <= 127 here).
        const float r = (xc[j] * inv + ROUNDER) - ROUNDER;
        const int8_t v = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
        block[(j % 2) * 64 + j / 2] = v;
        total += v;
      }
      std::fill_n(out.xs16.data() + (m * out.blocks + c / 4) * 16 + (c % 4) * 4, 4, scale);
      out.xsum[m * G + (c >> shift)] += scale * static_cast<float>(total);
    }
  return out;
}

template <int M, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void w4a8_tile_avx512(
    const QuantizedRows& x, int64_t C, int64_t shift, const uint8_t* packed, const float* scales,
    const float* zeros, float* y, int64_t ldy) {
  const int64_t half = C * 16, xrow = x.blocks * BLOCK, G = C >> shift;
  const __m512i low = _mm512_set1_epi8(0x0F);
  // Lane i holds chunk i / 4 of the block, in group (i / 4) >> shift of the block's first one.
  const __m512i lane_group = _mm512_srlv_epi32(
      _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), _mm512_set1_epi32(shift));
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < x.blocks; ++b) {
    const int64_t c0 = 4 * b, n = std::min<int64_t>(4, C - c0);
    const __mmask64 bytes = n == 4 ? ~__mmask64{0} : (__mmask64{1} << (16 * n)) - 1;
    prefetch_lines(packed + R * half + b * 64 * R, 64 * R);
    __m512i lo[R], hi[R];
    __m512 ws[R];
    for (int r = 0; r < R; ++r) {
      const __m512i v = _mm512_maskz_loadu_epi8(bytes, packed + r * half + c0 * 16);
      lo[r] = _mm512_and_si512(v, low);
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      const int64_t g0 = c0 >> shift, groups = ((c0 + n - 1) >> shift) - g0 + 1;
      const __m128 s4 = _mm_maskz_loadu_ps((1u << groups) - 1, scales + r * G + g0);
      ws[r] = _mm512_permutexvar_ps(lane_group, _mm512_castps128_ps512(s4));
    }
    for (int m = 0; m < M; ++m) {
      const int8_t* xb = x.q.data() + m * xrow + b * BLOCK;
      const __m512i xe = _mm512_loadu_si512(xb), xo = _mm512_loadu_si512(xb + 64);
      const __m512 xs = _mm512_loadu_ps(x.xs16.data() + (m * x.blocks + b) * 16);
      for (int r = 0; r < R; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], xe), hi[r], xo);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws[r], xs), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * ldy + r] = _mm512_reduce_add_ps(acc[m][r]);
  int4_offsets_avx512<M, R>(x.xsum.data(), scales, zeros, G, y, ldy);
}

template <int M, int R>
__attribute__((target("avx2,fma"))) void w4a8_tile_avx2(const QuantizedRows& x, int64_t C,
                                                        int64_t shift, const uint8_t* packed,
                                                        const float* scales, const float* zeros,
                                                        float* y, int64_t ldy) {
  const int64_t half = C * 16, xrow = x.blocks * BLOCK, G = C >> shift;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  // Two chunks (32 weight bytes) per step: the block's first or second half.
  for (int64_t c = 0; c < C; c += 2) {
    const bool pair = c + 1 < C;
    prefetch_lines(packed + R * half + c * 16 * R, 32 * R);
    __m256i lo[R], hi[R];
    __m256 ws[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = packed + r * half + c * 16;
      const __m256i v =
          pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
               : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      lo[r] = _mm256_and_si256(v, low);
      hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      const float s0 = scales[r * G + (c >> shift)];
      const float s1 = pair ? scales[r * G + ((c + 1) >> shift)] : 0.0f;
      ws[r] = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
    }
    const int64_t b = c / 4, offset = (c % 4) * 16;  // bytes into the block's even half
    for (int m = 0; m < M; ++m) {
      const int8_t* xb = x.q.data() + m * xrow + b * BLOCK + offset;
      const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
      const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 64));
      const __m256 xs = _mm256_loadu_ps(x.xs16.data() + (m * x.blocks + b) * 16 + (c % 4) * 4);
      for (int r = 0; r < R; ++r) {
        // codes <= 15 and |xq| <= 127: each 16-bit sum of four products stays under 2^13.
        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], xe),
                                               _mm256_maddubs_epi16(hi[r], xo));
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        acc[m][r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(ws[r], xs), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * ldy + r] = herd::hsum_avx2(acc[m][r]);
  int4_offsets_avx2<M, R>(x.xsum.data(), scales, zeros, G, y, ldy);
}

template <int M, int R>
void w4a8_tile_scalar(const QuantizedRows& x, int64_t C, int64_t shift, const uint8_t* packed,
                      const float* scales, const float* zeros, float* y, int64_t ldy) {
  const int64_t half = C * 16, xrow = x.blocks * BLOCK, G = C >> shift;
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float total = 0.0f;
      for (int64_t g = 0; g < G; ++g)
        total += (zeros[r * G + g] - INT4_MID * scales[r * G + g]) * x.xsum[m * G + g];
      for (int64_t c = 0; c < C; ++c) {
        const int8_t* xb = x.q.data() + m * xrow + (c / 4) * BLOCK + (c % 4) * 16;
        int32_t dot = 0;
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = packed[r * half + c * 16 + j];
          dot += (byte & 0x0F) * xb[j] + (byte >> 4) * xb[64 + j];
        }
        total += scales[r * G + (c >> shift)] * x.xs16[(m * x.blocks + c / 4) * 16 + (c % 4) * 4] *
                 static_cast<float>(dot);
      }
      y[m * ldy + r] = total;
    }
}

using W4A8Tile = void (*)(const QuantizedRows&, int64_t, int64_t, const uint8_t*, const float*,
                          const float*, float*, int64_t);

template <int M, int R>
W4A8Tile w4a8_tile() {
  if (herd::has_avx512_vnni()) return w4a8_tile_avx512<M, R>;
  if (has_avx2()) return w4a8_tile_avx2<M, R>;
  return w4a8_tile_scalar<M, R>;
}

template <int M>
void w4a8_batch(const QuantizedRows& x, int64_t C, int64_t shift, const uint8_t* packed,
                const float* scales, const float* zeros, float* y, int64_t N) {
  static const W4A8Tile full = w4a8_tile<M, ROWS>();
  static const W4A8Tile one = w4a8_tile<M, 1>();
  const int64_t half = C * 16, G = C >> shift;
  over_row_tiles(N, [&](int64_t n, bool whole) {
    (whole ? full : one)(x, C, shift, packed + n * half, scales + n * G, zeros + n * G, y + n, N);
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

at::Tensor w4a8_mm(const at::Tensor& x_in, const at::Tensor& p_in, const at::Tensor& s_in,
                   const at::Tensor& z_in, int64_t group_size) {
  TORCH_CHECK(group_size >= CHUNK && (group_size & (group_size - 1)) == 0,
              "w4a8_mm: group_size must be a power of two from 32, got ", group_size);
  TORCH_CHECK(p_in.scalar_type() == at::kByte && p_in.dim() == 2,
              "w4a8_mm: packed weight must be 2-D uint8, got ", p_in.scalar_type());
  const int64_t N = p_in.size(0), Kp = 2 * p_in.size(1), C = Kp / CHUNK, G = Kp / group_size;
  const int64_t shift = __builtin_ctzll(group_size / CHUNK);
  TORCH_CHECK(Kp % group_size == 0, "w4a8_mm: packed width ", Kp, " is not whole groups");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) <= Kp && x_in.size(1) > 0,
              "w4a8_mm: x has ", x_in.size(1), " columns, the weight holds ", Kp, " padded");
  check_x(x_in, x_in.size(1), "w4a8_mm");
  for (const at::Tensor* t : {&s_in, &z_in})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == N &&
                    t->size(1) == G,
                "w4a8_mm: scales and zeros must be float32 (", N, ", ", G, ")");
  const at::Tensor x = x_in.contiguous(), p = p_in.contiguous();
  const at::Tensor s = s_in.contiguous(), z = z_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; m += MAX_BATCH) {
    const int64_t rows = std::min<int64_t>(MAX_BATCH, M - m);
    const QuantizedRows xq = quantize_rows(x.data_ptr<float>() + m * K, rows, K, C, shift);
    const auto args = std::make_tuple(std::cref(xq), C, shift, p.data_ptr<uint8_t>(),
                                      s.data_ptr<float>(), z.data_ptr<float>(), yp + m * N, N);
    switch (rows) {
      case 1: std::apply(w4a8_batch<1>, args); break;
      case 2: std::apply(w4a8_batch<2>, args); break;
      case 3: std::apply(w4a8_batch<3>, args); break;
      default: std::apply(w4a8_batch<4>, args); break;
    }
  }
  return y;
}

at::Tensor int8_int8_mm(const at::Tensor& x_in, const at::Tensor& q_in) {
  TORCH_CHECK(q_in.scalar_type() == at::kChar && q_in.dim() == 2,
              "int8_int8_mm: weight must be 2-D int8, got ", q_in.scalar_type());
  const int64_t N = q_in.size(0), K = q_in.size(1);
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kChar && x_in.dim() == 2 &&
                  x_in.size(1) == K,
              "int8_int8_mm: x must be 2-D int8 with ", K, " columns, got ", x_in.scalar_type(),
              " ", x_in.sizes());
  const at::Tensor x = x_in.contiguous(), q = q_in.contiguous();
  const int64_t M = x.size(0);
  const int8_t* xp = x.data_ptr<int8_t>();
  std::vector<int32_t> xsums(M, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      TORCH_CHECK(xp[m * K + k] != -128, "int8_int8_mm: activations must lie in [-127, 127]");
      xsums[m] += xp[m * K + k];
    }
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kInt));
  int32_t* yp = y.data_ptr<int32_t>();
  for (int64_t m = 0; m < M; m += MAX_BATCH) {
    const auto args = std::make_tuple(xp + m * K, xsums.data() + m, K, q.data_ptr<int8_t>(),
                                      yp + m * N, N);
    switch (std::min<int64_t>(MAX_BATCH, M - m)) {
      case 1: std::apply(i8i8_batch<1>, args); break;
      case 2: std::apply(i8i8_batch<2>, args); break;
      case 3: std::apply(i8i8_batch<3>, args); break;
      default: std::apply(i8i8_batch<4>, args); break;
    }
  }
  return y;
}

std::string isa() { return has_avx512() ? "avx512" : has_avx2() ? "avx2" : "scalar"; }

}  // namespace

TORCH_LIBRARY(herd_cpu, m) {
  m.def("int8_mm(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def("w4a8_mm(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def("int8_int8_mm(Tensor x, Tensor qweight) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
  m.impl("w4a8_mm", &w4a8_mm);
  m.impl("int8_int8_mm", &int8_int8_mm);
}
