// The names torch.save archives give dtypes, shared by the torch.save reader and writer.
// Internal to the core.
#pragma once

#include <optional>
#include <string_view>

#include "tensormap/dtype.h"

namespace tensormap::detail {

// The dtype of a typed storage class (torch.<name>, e.g. "FloatStorage"), or nothing.
std::optional<Dtype> dtype_of_storage_class(std::string_view name);

// The typed storage class torch 1.x and 2.x write `dtype` with, or nullptr for the dtypes
// that have none (U16, U32, U64, F8: torch 2.x writes those as untyped storages).
const char* storage_class_of(Dtype dtype);

// The dtype torch pickles as torch.<name> (e.g. "bfloat16", "half"), or nothing.
std::optional<Dtype> dtype_of_torch_name(std::string_view name);

// The name torch 2.x pickles `dtype` under (e.g. "float8_e4m3fn").
const char* torch_name_of(Dtype dtype);

}  // namespace tensormap::detail
