// Whether bytes are well-formed UTF-8: for the name rules (names.h) and for quoting names
// in messages (error.h). Internal to the core.
#pragma once

#include <string_view>

namespace tensormap::detail {

// True if `text` is well-formed UTF-8: no overlong forms, no surrogates, nothing past
// U+10FFFF, no truncated sequence.
bool is_valid_utf8(std::string_view text);

}  // namespace tensormap::detail
