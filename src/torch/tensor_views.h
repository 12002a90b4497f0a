// Internal to the LibTorch layer: the helpers that tensor.cpp and state_dict.cpp share.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <string>
#include <string_view>
#include <vector>

#include "tensormap/file.h"

namespace tensormap::detail {

// The entry's shape as LibTorch sizes.
std::vector<int64_t> sizes_of(const TensorEntry& entry);

// The LibTorch type of `dtype`; Error(UnsupportedDtype) naming the file and the tensor
// where this LibTorch has none (1.13: U16, U32, U64, F8).
c10::ScalarType scalar_type_or_throw(Dtype dtype, const std::string& path, std::string_view name);

}  // namespace tensormap::detail
