// How the matrix-product kernels split their work: weight rows in tiles of ROWS over torch's
// threads, activation rows in tiles of up to MAX_BATCH, and the next weight tile prefetched
// while this one is read.
#pragma once

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace herd {

constexpr int ROWS = 4;       // weight rows per tile
constexpr int MAX_BATCH = 4;  // activation rows per tile; larger batches run in tiles of 4

// The next tile's rows follow this tile's in memory; a kernel that reads `bytes` of its tile
// per step fetches as many of the next one's, so each tile starts on warm lines.
inline void prefetch_lines(const void* next, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64)
    _mm_prefetch(static_cast<const char*>(next) + i, _MM_HINT_T0);
}

// Bytes beyond the next tile that prefetch_lines_far streams into L2.
constexpr int64_t L2_AHEAD = 16384;

// prefetch_lines, plus as many bytes from L2_AHEAD further on into L2. For the kernels whose
// tile compute outlasts its memory time at several activation rows (float32, int8, w8a8): one
// tile ahead left them waiting on DRAM; SmolLM2's 1536x576 float32 product from memory took 158 us
// for 8 rows against 94 for one, 107 with this (32 and 64 KB ahead were no better). The int4
// kernels, bound by unpacking, ran a sixth to a third slower with the second prefetch.
inline void prefetch_lines_far(const void* next, int64_t bytes) {
  const char* p = static_cast<const char*>(next);
  for (int64_t i = 0; i < bytes; i += 64) {
    _mm_prefetch(p + i, _MM_HINT_T0);
    _mm_prefetch(p + i + L2_AHEAD, _MM_HINT_T1);
  }
}

// Output rows in tiles of ROWS over torch's threads, each thread streaming its own part of the
// weight: tile(n, true) for the whole tile at row n, tile(n, false) for each remaining row.
template <typename Tile>
void over_row_tiles(int64_t N, const Tile& tile) {
  at::parallel_for(0, (N + ROWS - 1) / ROWS, 8, [&](int64_t t0, int64_t t1) {
    int64_t n = t0 * ROWS;
    const int64_t n1 = std::min(N, t1 * ROWS);
    for (; n + ROWS <= n1; n += ROWS) tile(n, true);
    for (; n < n1; ++n) tile(n, false);
  });
}

}  // namespace herd
