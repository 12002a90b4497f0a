// Internal to the LibTorch layer: turning a released tensor back into an ordinary one.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace tensormap::detail {

// Gives a released tensor its CPU dispatch keys back, so that set_() and copy_() reach
// it. REQUIRES: the caller gives it storage right after.
void prepare_to_bind(const at::Tensor& tensor);

// Tags a released tensor as missing from `checkpoint` under `name` (a non-strict load
// did not find it), so that using it says so. Does nothing to a tensor not released.
void mark_missing(const at::Tensor& tensor, const std::string& name, const std::string& checkpoint);

// Operators (schema names) registered on PrivateUse1 explicitly, besides the fallback.
const std::vector<const char*>& explicitly_checked_ops();

}  // namespace tensormap::detail
