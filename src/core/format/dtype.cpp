// The dtype table: on-disk code, safetensors name and element size, in one place.
#include "tensormap/dtype.h"

namespace tensormap {
namespace {

struct DtypeRow {
  Dtype dtype;
  std::string_view name;
  uint8_t size;
};

// Indexed by code; row 0 is the invalid code.
constexpr DtypeRow kTable[] = {
    {Dtype{0}, "", 0},         {Dtype::BOOL, "BOOL", 1},       {Dtype::U8, "U8", 1},
    {Dtype::I8, "I8", 1},      {Dtype::I16, "I16", 2},         {Dtype::U16, "U16", 2},
    {Dtype::I32, "I32", 4},    {Dtype::U32, "U32", 4},         {Dtype::I64, "I64", 8},
    {Dtype::U64, "U64", 8},    {Dtype::F16, "F16", 2},         {Dtype::BF16, "BF16", 2},
    {Dtype::F32, "F32", 4},    {Dtype::F64, "F64", 8},         {Dtype::C64, "C64", 8},
    {Dtype::C128, "C128", 16}, {Dtype::F8_E4M3, "F8_E4M3", 1}, {Dtype::F8_E5M2, "F8_E5M2", 1},
};
constexpr unsigned kCodeCount = sizeof(kTable) / sizeof(kTable[0]);

static_assert(sizeof(kAllDtypes) / sizeof(kAllDtypes[0]) == kCodeCount - 1);

const DtypeRow& row(Dtype dtype) {
  const auto code = static_cast<unsigned>(dtype);
  return kTable[code < kCodeCount ? code : 0];
}

}  // namespace

uint8_t dtype_size(Dtype dtype) { return row(dtype).size; }

std::string_view dtype_name(Dtype dtype) { return row(dtype).name; }

bool is_floating_point(Dtype dtype) {
  return dtype == Dtype::F16 || dtype == Dtype::BF16 || dtype == Dtype::F32 || dtype == Dtype::F64;
}

std::optional<Dtype> dtype_from_code(uint8_t code) {
  if (code == 0 || code >= kCodeCount) return std::nullopt;
  return kTable[code].dtype;
}

std::optional<Dtype> dtype_from_name(std::string_view name) {
  for (unsigned code = 1; code < kCodeCount; ++code) {
    if (kTable[code].name == name) return kTable[code].dtype;
  }
  return std::nullopt;
}

}  // namespace tensormap
