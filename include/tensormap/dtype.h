// Element types of tensors stored by tensormap.
//
// This is the one table of dtypes: its codes are the on-disk codes of spec/FORMAT.md
// section 5 and its names are those safetensors uses. Everything here is a pure
// function of constant data and safe to call from any thread.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "tensormap/export.h"

namespace tensormap {

enum class Dtype : uint8_t {
  BOOL = 1,
  U8 = 2,
  I8 = 3,
  I16 = 4,
  U16 = 5,
  I32 = 6,
  U32 = 7,
  I64 = 8,
  U64 = 9,
  F16 = 10,
  BF16 = 11,
  F32 = 12,
  F64 = 13,
  C64 = 14,
  C128 = 15,
  F8_E4M3 = 16,
  F8_E5M2 = 17,
};

// Every dtype, in code order.
inline constexpr Dtype kAllDtypes[] = {
    Dtype::BOOL, Dtype::U8,  Dtype::I8,   Dtype::I16,     Dtype::U16,     Dtype::I32,
    Dtype::U32,  Dtype::I64, Dtype::U64,  Dtype::F16,     Dtype::BF16,    Dtype::F32,
    Dtype::F64,  Dtype::C64, Dtype::C128, Dtype::F8_E4M3, Dtype::F8_E5M2,
};

// Size of one element in bytes.
TENSORMAP_EXPORT uint8_t dtype_size(Dtype dtype);

// The safetensors spelling, e.g. "BF16".
TENSORMAP_EXPORT std::string_view dtype_name(Dtype dtype);

// The dtype with this on-disk code, or nothing for an unknown code.
TENSORMAP_EXPORT std::optional<Dtype> dtype_from_code(uint8_t code);

// True for F16, BF16, F32 and F64: the dtypes a float conversion applies to.
TENSORMAP_EXPORT bool is_floating_point(Dtype dtype);

// The dtype with this name (exact, upper case), or nothing.
TENSORMAP_EXPORT std::optional<Dtype> dtype_from_name(std::string_view name);

// Converts `count` elements of `from` at `src` into `to` at `dest`, both among F16, BF16,
// F32 and F64, as LibTorch's Tensor::to does: rounding to nearest, ties to even, F64 to
// F16 or BF16 through F32, NaN kept a (quiet) NaN. Throws Error(InvalidArgument) for
// another dtype. `src` and `dest` need no alignment and must not overlap.
TENSORMAP_EXPORT void convert_floats(Dtype from, const void* src, Dtype to, void* dest, uint64_t count);

// The value of each of `count` elements of `from` at `src` as a double, for every real
// dtype (all but C64 and C128, for which it returns false and writes nothing).
TENSORMAP_EXPORT bool to_f64(Dtype from, const void* src, double* dest, uint64_t count);

}  // namespace tensormap
