// The one table of torch's names for dtypes.
#include "torch_save/torch_names.h"

namespace tensormap::detail {
namespace {

struct Names {
  Dtype dtype;
  const char* storage_class;  // nullptr: torch has no typed storage for it
  const char* torch_name;     // the canonical torch.<name>
};

constexpr Names kNames[] = {
    {Dtype::BOOL, "BoolStorage", "bool"},
    {Dtype::U8, "ByteStorage", "uint8"},
    {Dtype::I8, "CharStorage", "int8"},
    {Dtype::I16, "ShortStorage", "int16"},
    {Dtype::U16, nullptr, "uint16"},
    {Dtype::I32, "IntStorage", "int32"},
    {Dtype::U32, nullptr, "uint32"},
    {Dtype::I64, "LongStorage", "int64"},
    {Dtype::U64, nullptr, "uint64"},
    {Dtype::F16, "HalfStorage", "float16"},
    {Dtype::BF16, "BFloat16Storage", "bfloat16"},
    {Dtype::F32, "FloatStorage", "float32"},
    {Dtype::F64, "DoubleStorage", "float64"},
    {Dtype::C64, "ComplexFloatStorage", "complex64"},
    {Dtype::C128, "ComplexDoubleStorage", "complex128"},
    {Dtype::F8_E4M3, nullptr, "float8_e4m3fn"},
    {Dtype::F8_E5M2, nullptr, "float8_e5m2"},
};

// Other spellings torch accepts for the same dtypes.
constexpr std::pair<const char*, Dtype> kAliases[] = {
    {"short", Dtype::I16}, {"int", Dtype::I32},    {"long", Dtype::I64},   {"half", Dtype::F16},
    {"float", Dtype::F32}, {"double", Dtype::F64}, {"cfloat", Dtype::C64}, {"cdouble", Dtype::C128},
};

}  // namespace

std::optional<Dtype> dtype_of_storage_class(std::string_view name) {
  for (const Names& n : kNames) {
    if (n.storage_class && name == n.storage_class) return n.dtype;
  }
  return std::nullopt;
}

const char* storage_class_of(Dtype dtype) {
  for (const Names& n : kNames) {
    if (n.dtype == dtype) return n.storage_class;
  }
  return nullptr;
}

std::optional<Dtype> dtype_of_torch_name(std::string_view name) {
  for (const Names& n : kNames) {
    if (name == n.torch_name) return n.dtype;
  }
  for (const auto& [alias, dtype] : kAliases) {
    if (name == alias) return dtype;
  }
  return std::nullopt;
}

const char* torch_name_of(Dtype dtype) {
  for (const Names& n : kNames) {
    if (n.dtype == dtype) return n.torch_name;
  }
  return "unknown";
}

}  // namespace tensormap::detail
