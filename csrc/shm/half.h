// Portable fp16 and bf16 <-> fp32 conversions for the scalar reduction path.
//
// They round exactly as the vector paths do, so every path gives bitwise the same
// result: fp32 -> bf16 rounds to nearest even with NaN -> 0x7FC0 (as PyTorch does);
// fp32 -> fp16 rounds to nearest even, saturating to inf, NaN keeping its sign and top
// payload bits with the quiet bit set (as the F16C / AVX-512 instructions do).
#pragma once

#include <cstdint>
#include <cstring>

namespace plait::shm::half {

inline std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_to_f32(std::uint16_t h) { return float_of(static_cast<std::uint32_t>(h) << 16); }

inline std::uint16_t f32_to_bf16(float f) {
  const std::uint32_t u = bits_of(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  return static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1Fu;
  const std::uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1F) {  // inf, or NaN (made quiet, payload kept)
    return float_of(sign | 0x7F800000u | (mantissa ? 0x400000u | (mantissa << 13) : 0u));
  }
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    return float_of(sign | bits_of(static_cast<float>(mantissa) * 5.9604644775390625e-8f));
  }
  return float_of(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline std::uint16_t f32_to_f16(float f) {
  const std::uint32_t u = bits_of(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  std::uint32_t magnitude = u & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) {  // NaN: quiet, top 9 payload bits kept
    return static_cast<std::uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu));
  }
  if (magnitude >= 0x47800000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 2^16: inf
  if (magnitude < 0x38800000u) {
    // Below the smallest normal fp16 (2^-14): adding 0.5 lines the fp16 subnormal step
    // (2^-24) up with fp32's last mantissa bit, so the FPU's own round-to-nearest-even
    // does the rounding; the low bits are then the fp16 subnormal.
    const float aligned = float_of(magnitude) + 0.5f;
    return static_cast<std::uint16_t>(sign | (bits_of(aligned) - 0x3F000000u));
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even;
  // a carry out of the mantissa correctly bumps the exponent (up to inf).
  magnitude += 0xC8000FFFu + ((magnitude >> 13) & 1u);
  return static_cast<std::uint16_t>(sign | (magnitude >> 13));
}

}  // namespace plait::shm::half
