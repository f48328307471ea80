// Which instruction-set body a kernel runs, chosen once per process from CPUID, and the
// vector helpers the kernels share.
// HERD_CPU_ISA=avx2|scalar caps the choice (the tests run every body on one machine).
#pragma once

#include <immintrin.h>

#include <cstdlib>
#include <string>

namespace herd {

inline bool isa_allowed(const char* isa) {
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

inline bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && isa_allowed("avx512");
  return yes;
}

// Byte dot products (vpdpbusd) on 512-bit vectors, for the int8-activation kernels.
inline bool has_avx512_vnni() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
  return yes;
}

inline bool has_avx2() {
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && isa_allowed("avx2");
  return yes;
}

__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace herd
