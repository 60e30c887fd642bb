// bfloat16 for lorakit's C++ kernels: the upper half of an fp32, widened by a shift as it is loaded
// and rounded to nearest even as it is stored (as torch's conversion does).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace lorakit {

struct Bf16 {
    uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(Bf16 x) {
    const uint32_t wide = static_cast<uint32_t>(x.bits) << 16;
    float out;
    std::memcpy(&out, &wide, sizeof(out));
    return out;
}
inline void store(float* at, float x) { *at = x; }
inline void store(Bf16* at, float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    at->bits = std::isnan(x) ? 0x7fc0 : static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}
// x as bf16 would round it, back in fp32
inline float round_bf16(float x) {
    Bf16 b;
    store(&b, x);
    return to_float(b);
}

}  // namespace lorakit
