// Decoding attention over a slot cache, fp32 or bf16, one thread: each row has one query token, its
// query heads share key/value heads in groups of G, and row r attends to its own first lengths[r]
// columns. bf16 keys and values are widened to fp32 as they are loaded; sums are fp32 throughout.
//
// Why not torch's SDPA: for one query token per row, its CPU flash kernel runs a blocked loop made
// for many query tokens and reads every row up to the widest row's width (a padded 4-D mask), at
// 8-10 GB/s on a core that streams 37 GB/s (in bf16 it is slower still). Here the G query heads of a key/value head go through
// each key and value column together, every row stops at its own length, and the dot products of
// four columns are reduced at once. Built at first use by decode_attention.py (ctypes: no Python
// headers, no torch headers, a one-second compile).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LORAKIT_AVX2 1
#endif

namespace {

// exp(x) for x <= 0 (scores minus their maximum): 2^n times a degree-6 polynomial of the remainder
// (Cephes' expf coefficients), written so that the compiler vectorises the loop that calls it.
inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = std::floor(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float power;
    std::memcpy(&power, &bits, sizeof(power));
    return p * power;
}

using lorakit::Bf16;
using lorakit::store;
using lorakit::to_float;

#ifdef LORAKIT_AVX2
inline __m256 load8(const float* at) { return _mm256_loadu_ps(at); }
inline __m256 load8(const Bf16* at) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
#endif

struct Strides {  // in elements; the last dimension of every tensor is contiguous
    int64_t q_row, q_head, k_row, k_head, k_col, v_row, v_head, v_col, o_row, o_head;
};

// scores[g * length + col] = q_g . k_col; more than 3 heads go 3 at a time (the row's keys are in
// cache by then), so that the accumulators fit in 16 vector registers
template <int64_t G, int64_t D, typename T>
void dot_products(const float* q, const T* k, int64_t k_col, int64_t length, float* scores) {
    if constexpr (G > 3) {
        dot_products<3, D>(q, k, k_col, length, scores);
        dot_products<G - 3, D>(q + 3 * D, k, k_col, length, scores + 3 * length);
        return;
    }
    int64_t col = 0;
#ifdef LORAKIT_AVX2
    if constexpr (D % 8 == 0) {  // 4 columns x G heads of accumulators: at most 12 registers
        for (; col + 4 <= length; col += 4) {
            __m256 sums[G][4];
            for (int64_t g = 0; g < G; ++g)
                for (int c = 0; c < 4; ++c) sums[g][c] = _mm256_setzero_ps();
            for (int64_t i = 0; i < D; i += 8) {
                __m256 keys[4];
                for (int c = 0; c < 4; ++c) keys[c] = load8(k + (col + c) * k_col + i);
                if (i % 16 == 0)  // the columns a few steps ahead: each row's block is a short stream
                    for (int c = 0; c < 4; ++c) __builtin_prefetch(k + (col + c + 16) * k_col + i);
                for (int64_t g = 0; g < G; ++g) {
                    const __m256 query = _mm256_loadu_ps(q + g * D + i);
                    for (int c = 0; c < 4; ++c) sums[g][c] = _mm256_fmadd_ps(query, keys[c], sums[g][c]);
                }
            }
            for (int64_t g = 0; g < G; ++g) {  // four horizontal sums at once
                const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(sums[g][0], sums[g][1]),
                                                    _mm256_hadd_ps(sums[g][2], sums[g][3]));
                _mm_storeu_ps(scores + g * length + col,
                              _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1)));
            }
        }
    }
#endif
    for (; col < length; ++col)
        for (int64_t g = 0; g < G; ++g) {
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < D; ++i) dot += q[g * D + i] * to_float(k[col * k_col + i]);
            scores[g * length + col] = dot;
        }
}

// out_g = sum over columns of p[g * length + col] * v_col, 32 (or 8) of D at a time, 3 heads at a
// time: the G x 32 accumulators stay in registers
template <int64_t G, int64_t D, typename T>
void weighted_values(const float* p, const T* v, int64_t v_col, int64_t length, T* out, int64_t o_head) {
    if constexpr (G > 3) {
        weighted_values<3, D>(p, v, v_col, length, out, o_head);
        weighted_values<G - 3, D>(p + 3 * length, v, v_col, length, out + 3 * o_head, o_head);
        return;
    }
    constexpr int64_t SLICE = D % 32 == 0 ? 32 : 8;
    for (int64_t part = 0; part < D; part += SLICE) {
        float sums[G][SLICE] = {};
        for (int64_t col = 0; col < length; ++col) {
            const T* values = v + col * v_col + part;
            __builtin_prefetch(values + 16 * v_col);
            for (int64_t g = 0; g < G; ++g) {
                const float weight = p[g * length + col];
#pragma omp simd
                for (int64_t i = 0; i < SLICE; ++i) sums[g][i] += weight * to_float(values[i]);
            }
        }
        for (int64_t g = 0; g < G; ++g)
            for (int64_t i = 0; i < SLICE; ++i) store(out + g * o_head + part + i, sums[g][i]);
    }
}

template <int64_t G, int64_t D, typename T>
void attend(const T* q, const T* k, const T* v, T* out, const Strides& s, const int64_t* lengths, int64_t rows,
            int64_t kv_heads, float scale) {
    std::vector<float> scores;
    float query[G * D];
    for (int64_t row = 0; row < rows; ++row) {
        const int64_t length = lengths[row];
        scores.resize(G * length);
        for (int64_t head = 0; head < kv_heads; ++head) {
            const T* q_first = q + row * s.q_row + head * G * s.q_head;
            for (int64_t g = 0; g < G; ++g)
                for (int64_t i = 0; i < D; ++i) query[g * D + i] = to_float(q_first[g * s.q_head + i]) * scale;
            dot_products<G, D>(query, k + row * s.k_row + head * s.k_head, s.k_col, length, scores.data());
            for (int64_t g = 0; g < G; ++g) {  // softmax over the row's columns
                float* p = scores.data() + g * length;
                float top = p[0];
#pragma omp simd reduction(max : top)
                for (int64_t col = 1; col < length; ++col) top = p[col] > top ? p[col] : top;
                float total = 0.0f;
#pragma omp simd reduction(+ : total)
                for (int64_t col = 0; col < length; ++col) {
                    p[col] = exp_nonpositive(p[col] - top);
                    total += p[col];
                }
                const float inverse = 1.0f / total;
#pragma omp simd
                for (int64_t col = 0; col < length; ++col) p[col] *= inverse;
            }
            weighted_values<G, D>(scores.data(), v + row * s.v_row + head * s.v_head, s.v_col, length,
                                  out + row * s.o_row + head * G * s.o_head, s.o_head);
        }
    }
}

template <typename T>
using Kernel = void (*)(const T*, const T*, const T*, T*, const Strides&, const int64_t*, int64_t, int64_t, float);

template <int64_t D, typename T>
Kernel<T> for_groups(int64_t groups) {
    switch (groups) {
        case 1: return attend<1, D, T>;
        case 2: return attend<2, D, T>;
        case 3: return attend<3, D, T>;
        case 4: return attend<4, D, T>;
        case 5: return attend<5, D, T>;
        case 6: return attend<6, D, T>;
        case 7: return attend<7, D, T>;
        case 8: return attend<8, D, T>;
        default: return nullptr;
    }
}

template <typename T>
Kernel<T> kernel_for(int64_t groups, int64_t dim) {
    switch (dim) {
        case 64: return for_groups<64, T>(groups);
        case 80: return for_groups<80, T>(groups);
        case 96: return for_groups<96, T>(groups);
        case 128: return for_groups<128, T>(groups);
        case 256: return for_groups<256, T>(groups);
        default: return nullptr;
    }
}

// Any other group count or head size: the same steps with plain loops (correct, not tuned)
template <typename T>
void attend_any(const T* q, const T* k, const T* v, T* out, const Strides& s, const int64_t* lengths, int64_t rows,
                int64_t kv_heads, int64_t groups, int64_t dim, float scale) {
    std::vector<float> scores, sums(dim);
    for (int64_t row = 0; row < rows; ++row) {
        const int64_t length = lengths[row];
        scores.resize(length);
        for (int64_t head = 0; head < kv_heads * groups; ++head) {
            const T* query = q + row * s.q_row + head * s.q_head;
            const T* keys = k + row * s.k_row + (head / groups) * s.k_head;
            const T* values = v + row * s.v_row + (head / groups) * s.v_head;
            float top = -INFINITY;
            for (int64_t col = 0; col < length; ++col) {
                float dot = 0.0f;
                for (int64_t i = 0; i < dim; ++i) dot += to_float(query[i]) * to_float(keys[col * s.k_col + i]);
                scores[col] = dot * scale;
                top = std::max(top, scores[col]);
            }
            float total = 0.0f;
            for (int64_t col = 0; col < length; ++col) total += scores[col] = exp_nonpositive(scores[col] - top);
            std::fill(sums.begin(), sums.end(), 0.0f);
            for (int64_t col = 0; col < length; ++col)
                for (int64_t i = 0; i < dim; ++i) sums[i] += scores[col] * to_float(values[col * s.v_col + i]);
            T* o = out + row * s.o_row + head * s.o_head;
            for (int64_t i = 0; i < dim; ++i) store(o + i, sums[i] / total);
        }
    }
}

template <typename T>
void run(const T* q, const T* k, const T* v, T* out, const Strides& strides, const int64_t* lengths, int64_t rows,
         int64_t kv_heads, int64_t groups, int64_t dim, float scale) {
    const Kernel<T> kernel = kernel_for<T>(groups, dim);
    if (kernel != nullptr)
        kernel(q, k, v, out, strides, lengths, rows, kv_heads, scale);
    else
        attend_any(q, k, v, out, strides, lengths, rows, kv_heads, groups, dim, scale);
}

}  // namespace

extern "C" int64_t lorakit_decode_attention_tuned(int64_t groups, int64_t dim) {
    return kernel_for<float>(groups, dim) != nullptr;
}

extern "C" int64_t lorakit_decode_attention_vectorised() {
#ifdef LORAKIT_AVX2
    return 1;
#else
    return 0;
#endif
}

// q: rows x (kv_heads * groups) heads x dim; k, v: rows x kv_heads x columns x dim; out: rows x heads
// x dim; all of one element type, `bf16` saying which (0: fp32, 1: bfloat16).
extern "C" void lorakit_decode_attention(const void* q, int64_t q_row, int64_t q_head, const void* k, int64_t k_row,
                                         int64_t k_head, int64_t k_col, const void* v, int64_t v_row, int64_t v_head,
                                         int64_t v_col, void* out, int64_t o_row, int64_t o_head,
                                         const int64_t* lengths, int64_t rows, int64_t kv_heads, int64_t groups,
                                         int64_t dim, float scale, int64_t bf16) {
    const Strides strides{q_row, q_head, k_row, k_head, k_col, v_row, v_head, v_col, o_row, o_head};
    if (bf16)
        run(static_cast<const Bf16*>(q), static_cast<const Bf16*>(k), static_cast<const Bf16*>(v),
            static_cast<Bf16*>(out), strides, lengths, rows, kv_heads, groups, dim, scale);
    else
        run(static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v),
            static_cast<float*>(out), strides, lengths, rows, kv_heads, groups, dim, scale);
}
