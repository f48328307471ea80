// Attention of one new query per row over a key/value cache: the decode step's attention.
//
// Only the slots the mask marks valid are read: a 600-token context in a 1,024-slot static
// cache reads 600 key and value rows, where masked dense attention reads (and exponentiates)
// all 1,024; and a paged cache's whole pool can be passed as the keys of every row (an expanded
// view, no copy) with a mask that marks each row's own slots, so no gathered copy of a row's
// keys is made. Each row's valid slots are listed first, then split into chunks of CHUNK over
// torch's threads (each chunk keeps its own running maximum, sum and weighted values, combined
// at the end, as in flash decoding), so even one row with few key/value heads fills every
// thread. Grouped-query heads that share a key/value head are computed together: each key and
// value row is loaded once for the whole group.
//
// q (B, H, 1, D), k and v (B, KV, S, D) with unit stride on D (any other strides, a batch
// stride of 0 included), valid (B or 1, S) bool; query head h attends with key/value head
// h / (H / KV). Arithmetic is float32; exp is a degree-6 polynomial after range reduction
// (about 1 ulp). A row with no valid slot gives 0.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "isa.h"

namespace {

constexpr int64_t CHUNK = 64;  // slots per work unit
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float LOG2E = 1.44269504088896341f;
constexpr float LN2_HI = 0.693145751953125f;  // ln 2 split so that n * LN2_HI is exact
constexpr float LN2_LO = 1.42860682030941723e-6f;
constexpr float EXP_MIN = -87.0f;  // exp stays a normal float above this

// One chunk's slots seen by G query heads: scores, then probabilities and weighted values.
struct Chunk {
  const float* q;      // G rows of D, q_stride apart
  int64_t q_stride;
  float scale;
  const float* k;      // the row's and head's first slot; the chunk's slot s at
  const float* v;      // k + slot[s] * k_stride
  int64_t k_stride, v_stride;  // floats between slots
  const int32_t* slot;  // n valid slots
  int64_t n, G, D;
  float* scores;       // G x n
  float* out;          // G x D, accumulated
};

// ------------------------------------------------------------------------------- AVX-512

__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// Each query head's row stays in registers over the chunk (the chunk's key rows come from L1
// after the first head), as do its weighted-value accumulators: NV vectors cover D.
template <int NV>
__attribute__((target("avx512f"))) void scores_avx512(const Chunk& c) {
  for (int64_t g = 0; g < c.G; ++g) {
    __m512 qv[NV];
    for (int i = 0; i < NV; ++i) qv[i] = _mm512_loadu_ps(c.q + g * c.q_stride + 16 * i);
    float* out = c.scores + g * c.n;
    for (int64_t s = 0; s < c.n; ++s) {
      const float* ks = c.k + c.slot[s] * c.k_stride;
      __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(ks));
      for (int i = 1; i < NV; ++i) acc = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(ks + 16 * i), acc);
      out[s] = _mm512_reduce_add_ps(acc) * c.scale;
    }
  }
}

// x[i] = exp(x[i] - m), exactly 0 where x[i] is -inf; returns the sum.
__attribute__((target("avx512f"))) float exp_sum_avx512(float* x, int64_t n, float m) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 mv = _mm512_set1_ps(m), ninf = _mm512_set1_ps(NEG_INF);
  int64_t i = 0;
  for (; i < n; i += 16) {
    const __mmask16 lanes = i + 16 <= n ? 0xFFFF : (1u << (n - i)) - 1;
    const __m512 xv = _mm512_maskz_loadu_ps(lanes, x + i);
    const __mmask16 live = _mm512_mask_cmp_ps_mask(lanes, xv, ninf, _CMP_GT_OQ);
    const __m512 e = _mm512_maskz_mov_ps(live, exp_avx512(_mm512_sub_ps(xv, mv)));
    _mm512_mask_storeu_ps(x + i, lanes, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

template <int NV>
__attribute__((target("avx512f"))) void values_avx512(const Chunk& c) {
  for (int64_t g = 0; g < c.G; ++g) {
    __m512 o[NV];
    for (int i = 0; i < NV; ++i) o[i] = _mm512_setzero_ps();
    const float* p = c.scores + g * c.n;
    for (int64_t s = 0; s < c.n; ++s) {
      const float* vs = c.v + c.slot[s] * c.v_stride;
      const __m512 w = _mm512_set1_ps(p[s]);
      for (int i = 0; i < NV; ++i) o[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vs + 16 * i), o[i]);
    }
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(c.out + g * c.D + 16 * i, o[i]);
  }
}

// ---------------------------------------------------------------------------------- AVX2

__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  // 2^n from the exponent bits: n is in [-126, 0] here.
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

template <int NV>
__attribute__((target("avx2,fma"))) void scores_avx2(const Chunk& c) {
  for (int64_t g = 0; g < c.G; ++g) {
    __m256 qv[NV];
    for (int i = 0; i < NV; ++i) qv[i] = _mm256_loadu_ps(c.q + g * c.q_stride + 8 * i);
    float* out = c.scores + g * c.n;
    for (int64_t s = 0; s < c.n; ++s) {
      const float* ks = c.k + c.slot[s] * c.k_stride;
      __m256 acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(ks));
      for (int i = 1; i < NV; ++i) acc = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(ks + 8 * i), acc);
      out[s] = herd::hsum_avx2(acc) * c.scale;
    }
  }
}

__attribute__((target("avx2,fma"))) float exp_sum_avx2(float* x, int64_t n, float m) {
  __m256 sum = _mm256_setzero_ps();
  const __m256 mv = _mm256_set1_ps(m), ninf = _mm256_set1_ps(NEG_INF);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    const __m256 live = _mm256_cmp_ps(xv, ninf, _CMP_GT_OQ);
    const __m256 e = _mm256_and_ps(live, exp_avx2(_mm256_sub_ps(xv, mv)));
    _mm256_storeu_ps(x + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = herd::hsum_avx2(sum);
  for (; i < n; ++i) total += (x[i] = x[i] == NEG_INF ? 0.0f : std::exp(x[i] - m));
  return total;
}

template <int NV>
__attribute__((target("avx2,fma"))) void values_avx2(const Chunk& c) {
  for (int64_t g = 0; g < c.G; ++g) {
    __m256 o[NV];
    for (int i = 0; i < NV; ++i) o[i] = _mm256_setzero_ps();
    const float* p = c.scores + g * c.n;
    for (int64_t s = 0; s < c.n; ++s) {
      const float* vs = c.v + c.slot[s] * c.v_stride;
      const __m256 w = _mm256_set1_ps(p[s]);
      for (int i = 0; i < NV; ++i) o[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vs + 8 * i), o[i]);
    }
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(c.out + g * c.D + 8 * i, o[i]);
  }
}

// -------------------------------------------------------------------------------- scalar

void scores_scalar(const Chunk& c) {
  for (int64_t s = 0; s < c.n; ++s)
    for (int64_t g = 0; g < c.G; ++g) {
      float acc = 0.0f;
      for (int64_t d = 0; d < c.D; ++d) acc += c.q[g * c.q_stride + d] * c.k[c.slot[s] * c.k_stride + d];
      c.scores[g * c.n + s] = acc * c.scale;
    }
}

float exp_sum_scalar(float* x, int64_t n, float m) {
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i) total += (x[i] = x[i] == NEG_INF ? 0.0f : std::exp(x[i] - m));
  return total;
}

void values_scalar(const Chunk& c) {
  for (int64_t s = 0; s < c.n; ++s) {
    for (int64_t g = 0; g < c.G; ++g)
      for (int64_t d = 0; d < c.D; ++d)
        c.out[g * c.D + d] += c.scores[g * c.n + s] * c.v[c.slot[s] * c.v_stride + d];
  }
}

struct Body {
  void (*scores)(const Chunk&);
  float (*exp_sum)(float*, int64_t, float);
  void (*values)(const Chunk&);
};

template <int NV>
Body avx512() {
  return {scores_avx512<NV>, exp_sum_avx512, values_avx512<NV>};
}

template <int NV>
Body avx2() {
  return {scores_avx2<NV>, exp_sum_avx2, values_avx2<NV>};
}

// Head widths of whole vectors up to 128 (every Llama's is 64 or 128) run vectorised.
Body pick(int64_t D) {
  if (herd::has_avx512() && D % 16 == 0 && D <= 128) {
    switch (D / 16) {
      case 1: return avx512<1>();
      case 2: return avx512<2>();
      case 3: return avx512<3>();
      case 4: return avx512<4>();
      case 5: return avx512<5>();
      case 6: return avx512<6>();
      case 7: return avx512<7>();
      default: return avx512<8>();
    }
  }
  if (herd::has_avx2() && D % 8 == 0 && (D <= 64 || D == 96 || D == 128)) {
    switch (D / 8) {
      case 1: return avx2<1>();
      case 2: return avx2<2>();
      case 3: return avx2<3>();
      case 4: return avx2<4>();
      case 5: return avx2<5>();
      case 6: return avx2<6>();
      case 7: return avx2<7>();
      case 8: return avx2<8>();
      case 12: return avx2<12>();
      default: return avx2<16>();
    }
  }
  return {scores_scalar, exp_sum_scalar, values_scalar};
}

// ------------------------------------------------------------------------------------- op

struct Unit {
  int64_t b, j;          // batch row, key/value head
  const int32_t* slot;   // its n valid slots
  int64_t n;
};

// The valid slots of each mask row in order. Masks over a large cache are mostly false (a
// paged pool holds every sequence's slots), so eight flags are tested at a time.
std::vector<std::vector<int32_t>> valid_slots(const at::Tensor& valid) {
  const int64_t R = valid.size(0), S = valid.size(1);
  std::vector<std::vector<int32_t>> slots(R);
  for (int64_t r = 0; r < R; ++r) {
    const bool* row = valid.data_ptr<bool>() + r * valid.stride(0);
    int64_t s = 0;
    for (; s + 8 <= S; s += 8) {
      uint64_t word;
      std::memcpy(&word, row + s, 8);
      if (word == 0) continue;
      for (int64_t t = s; t < s + 8; ++t)
        if (row[t]) slots[r].push_back(static_cast<int32_t>(t));
    }
    for (; s < S; ++s)
      if (row[s]) slots[r].push_back(static_cast<int32_t>(s));
  }
  return slots;
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& valid_in, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes(),
              "decode_attention: q must be (B, H, 1, D) and k, v (B, KV, S, D), got ",
              q_in.sizes(), ", ", k.sizes(), ", ", v.sizes());
  for (const at::Tensor* t : {&q_in, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat,
                "decode_attention: q, k and v must be float32 CPU tensors, got ",
                t->scalar_type());
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(3);
  const int64_t KV = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && KV > 0 && H % KV == 0,
              "decode_attention: ", H, " query heads of width ", D, " over ", KV,
              " key/value heads of shape ", k.sizes());
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: k and v need unit stride on D (the cache's layout)");
  TORCH_CHECK(valid_in.scalar_type() == at::kBool && valid_in.size(-1) == S &&
                  (valid_in.numel() == S || valid_in.numel() == B * S),
              "decode_attention: valid must be a bool mask of (B or 1) x ", S, " slots, got ",
              valid_in.sizes());
  at::Tensor valid = valid_in.reshape({-1, S});
  if (valid.stride(1) != 1) valid = valid.contiguous();
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  TORCH_CHECK(S < (int64_t{1} << 31), "decode_attention: at most 2^31 slots, got ", S);
  const std::vector<std::vector<int32_t>> slots = valid_slots(valid);
  const int64_t G = H / KV;
  // Work units: CHUNK valid slots of one row and key/value head.
  std::vector<Unit> units;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < KV; ++j) {
      const std::vector<int32_t>& row = slots[slots.size() == 1 ? 0 : b];
      for (int64_t first = 0; first < static_cast<int64_t>(row.size()); first += CHUNK)
        units.push_back({b, j, row.data() + first,
                         std::min<int64_t>(CHUNK, static_cast<int64_t>(row.size()) - first)});
    }
  const int64_t U = static_cast<int64_t>(units.size());
  std::vector<float> maxes(U * G), sums(U * G), outs(U * G * D, 0.0f);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float scale_f = static_cast<float>(scale);
  const Body body = pick(D);
  at::parallel_for(0, U, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * CHUNK);
    for (int64_t u = begin; u < end; ++u) {
      const Unit& w = units[u];
      float* m = maxes.data() + u * G;
      float* l = sums.data() + u * G;
      const Chunk chunk{qp + w.b * q.stride(0) + w.j * G * q.stride(1), q.stride(1), scale_f,
                        kp + w.b * k.stride(0) + w.j * k.stride(1),
                        vp + w.b * v.stride(0) + w.j * v.stride(1),
                        k.stride(2), v.stride(2), w.slot, w.n, G, D, scores.data(),
                        outs.data() + u * G * D};
      body.scores(chunk);
      for (int64_t g = 0; g < G; ++g) {
        float* row = scores.data() + g * w.n;
        m[g] = *std::max_element(row, row + w.n);
        l[g] = body.exp_sum(row, w.n, m[g]);
      }
      body.values(chunk);
    }
  });
  at::Tensor out = at::zeros({B, H, 1, D}, q.options());
  float* op = out.data_ptr<float>();
  // Each (row, head)'s units are consecutive: combine their partial softmaxes.
  for (int64_t first = 0, last; first < U; first = last) {
    last = first;
    while (last < U && units[last].b == units[first].b && units[last].j == units[first].j) ++last;
    const int64_t b = units[first].b, j = units[first].j;
    for (int64_t g = 0; g < G; ++g) {
      float top = NEG_INF;
      for (int64_t u = first; u < last; ++u) top = std::max(top, maxes[u * G + g]);
      float* o = op + (b * H + j * G + g) * D;
      float total = 0.0f;
      for (int64_t u = first; u < last; ++u) {
        const float w = std::exp(maxes[u * G + g] - top);
        total += w * sums[u * G + g];
        const float* part = outs.data() + (u * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * part[d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= total;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(herd_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor valid, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
