// The rules for tensor names, metadata keys and values (spec rule 14), shared by the
// reader and the writer. Internal to the core.
#pragma once

#include <string>
#include <string_view>

#include "tensormap/error.h"
#include "util/utf8.h"

namespace tensormap::detail {

// Why `name` cannot be a tensor name or metadata key, or "" if it can.
std::string name_problem(std::string_view name);

// Why `value` cannot be a metadata value, or "" if it can.
std::string value_problem(std::string_view value);

// tensormap::quoted_name (error.h). The overloads keep std::quoted, which argument-
// dependent lookup finds for a std::string where <iomanip> is included, out of the way.
inline std::string quoted(std::string_view text) { return quoted_name(text); }
inline std::string quoted(const std::string& text) { return quoted_name(text); }
inline std::string quoted(const char* text) { return quoted_name(text); }

}  // namespace tensormap::detail
