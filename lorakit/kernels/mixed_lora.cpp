// The LoRA term of a decoding step over mixed adapters, fp32 or bf16, one thread:
//     y[i] += B[s] · (A[s] · x[i])   for every row i, with s = slots[i] (rows with a negative slot: none)
// A: slots × r × in (each adapter's A, rows contiguous), B: slots × r × out (its s·Bᵀ, the scaling
// folded in); x, y: rows × in / rows × out with their own row strides. Sums are fp32; in bf16 the
// r-wide intermediate is rounded to bf16 before it meets B, as two bf16 GEMMs would round it.
//
// Why not torch's GEMMs: at one token per row the work is a few hundred thousand multiply-adds a
// layer, and two GEMMs over every adapter side by side (plus a mask of each row's own columns) cost
// 50-80 µs a layer in fixed overheads (benchmarks/mixed_lora.py). Here each row reads only its own
// adapter's r × in and r × out. Built at first use by mixed_lora.py (kernels/native.py).
#include <cstdint>

#include "bf16.h"

namespace {

using lorakit::Bf16;
using lorakit::round_bf16;
using lorakit::store;
using lorakit::to_float;

constexpr int64_t LANES = 16;      // independent partial sums: the compiler vectorises across them
constexpr int64_t MAX_RANK = 256;  // the intermediate lives on the stack

template <typename T>
float dot(const T* a, const T* b, int64_t n) {
    float partial[LANES] = {};
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int64_t l = 0; l < LANES; ++l) partial[l] += to_float(a[k + l]) * to_float(b[k + l]);
    float sum = 0.0f;
    for (int64_t l = 0; l < LANES; ++l) sum += partial[l];
    for (; k < n; ++k) sum += to_float(a[k]) * to_float(b[k]);
    return sum;
}

template <typename T>
void mixed_lora(const T* x, int64_t ldx, int64_t rows, int64_t in, const T* A, const T* B, int64_t rank,
                int64_t out, const int64_t* slots, T* y, int64_t ldy) {
    float h[MAX_RANK];
    constexpr bool low = sizeof(T) == 2;
    for (int64_t i = 0; i < rows; ++i) {
        const int64_t s = slots[i];
        if (s < 0) continue;
        const T* a = A + s * rank * in;
        for (int64_t j = 0; j < rank; ++j) {
            h[j] = dot(x + i * ldx, a + j * in, in);
            if (low) h[j] = round_bf16(h[j]);
        }
        const T* b = B + s * rank * out;
        T* yi = y + i * ldy;
        int64_t c = 0;
        for (; c + LANES <= out; c += LANES) {  // each output column once: y + Σ_j h_j·B[j]
            float sum[LANES];
            for (int64_t l = 0; l < LANES; ++l) sum[l] = to_float(yi[c + l]);
            for (int64_t j = 0; j < rank; ++j)
                for (int64_t l = 0; l < LANES; ++l) sum[l] += h[j] * to_float(b[j * out + c + l]);
            for (int64_t l = 0; l < LANES; ++l) store(yi + c + l, sum[l]);
        }
        for (; c < out; ++c) {
            float sum = to_float(yi[c]);
            for (int64_t j = 0; j < rank; ++j) sum += h[j] * to_float(b[j * out + c]);
            store(yi + c, sum);
        }
    }
}

}  // namespace

extern "C" {

int64_t lorakit_mixed_lora_max_rank() { return MAX_RANK; }

// `bf16` says the element type of x, A, B and y (0: fp32, 1: bfloat16); slots are int64.
void lorakit_mixed_lora(const void* x, int64_t ldx, int64_t rows, int64_t in, const void* A, const void* B,
                        int64_t rank, int64_t out, const int64_t* slots, void* y, int64_t ldy, int64_t bf16) {
    if (bf16)
        mixed_lora(static_cast<const Bf16*>(x), ldx, rows, in, static_cast<const Bf16*>(A),
                   static_cast<const Bf16*>(B), rank, out, slots, static_cast<Bf16*>(y), ldy);
    else
        mixed_lora(static_cast<const float*>(x), ldx, rows, in, static_cast<const float*>(A),
                   static_cast<const float*>(B), rank, out, slots, static_cast<float*>(y), ldy);
}

}  // extern "C"
