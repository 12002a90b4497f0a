// The rules for tensor names, metadata keys and values (spec rule 14), shared by the
// reader and the writer. Internal to the core.
#pragma once

#include <string>
#include <string_view>

#include "tensormap/error.h"

namespace tensormap::detail {

// True if `text` is well-formed UTF-8: no overlong forms, no surrogates, nothing past
// U+10FFFF, no truncated sequence.
bool is_valid_utf8(std::string_view text);

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
