// Little-endian loads and stores on unaligned byte buffers, and checked arithmetic.
// Internal to the core.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "tensormap assumes a little-endian host; add byte swapping here to port it"
#endif

namespace tensormap::detail {

template <typename T>
inline T load_le(const unsigned char* p) {
  T value;
  std::memcpy(&value, p, sizeof(T));
  return value;
}

template <typename T>
inline void store_le(unsigned char* p, T value) {
  std::memcpy(p, &value, sizeof(T));
}

inline std::optional<uint64_t> checked_add(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_add_overflow(a, b, &r)) return std::nullopt;
  return r;
}

inline std::optional<uint64_t> checked_mul(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

}  // namespace tensormap::detail
