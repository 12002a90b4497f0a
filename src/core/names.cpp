// Validation of names and metadata strings (spec rule 14).
#include "names.h"

#include <cstdio>

#include "tensormap/format.h"

namespace tensormap::detail {

bool is_valid_utf8(std::string_view text) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  const auto* end = p + text.size();
  while (p < end) {
    const unsigned c = *p;
    if (c < 0x80) {
      ++p;
      continue;
    }
    unsigned length;
    uint32_t code;
    uint32_t min;
    if ((c & 0xE0) == 0xC0) {
      length = 2, code = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      length = 3, code = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      length = 4, code = c & 0x07, min = 0x10000;
    } else {
      return false;  // a continuation byte or 0xF8..0xFF where a sequence must start
    }
    if (static_cast<size_t>(end - p) < length) return false;
    for (unsigned i = 1; i < length; ++i) {
      if ((p[i] & 0xC0) != 0x80) return false;
      code = (code << 6) | (p[i] & 0x3F);
    }
    if (code < min || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return false;
    p += length;
  }
  return true;
}

std::string name_problem(std::string_view name) {
  if (name.empty()) return "is empty";
  if (name.size() > format::kMaxNameLength) {
    return "is " + std::to_string(name.size()) + " bytes long, more than the limit of " +
           std::to_string(format::kMaxNameLength);
  }
  if (name.find('\0') != std::string_view::npos) return "contains a NUL byte";
  if (!is_valid_utf8(name)) return "is not valid UTF-8";
  return "";
}

std::string value_problem(std::string_view value) {
  if (!is_valid_utf8(value)) return "is not valid UTF-8";
  return "";
}

}  // namespace tensormap::detail

namespace tensormap {

std::string quoted_name(std::string_view text) {
  using detail::is_valid_utf8;
  constexpr size_t kMaxShown = 80;
  const bool utf8 = is_valid_utf8(text);
  std::string out = "'";
  for (size_t i = 0; i < text.size() && i < kMaxShown; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x20 && c < 0x7F && c != '\\' && c != '\'') {
      out += static_cast<char>(c);
    } else if (c >= 0x80 && utf8) {
      out += static_cast<char>(c);  // keep readable non-ASCII names as they are
    } else {
      char buf[5];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  if (text.size() > kMaxShown) out += "...";
  return out + "'";
}

}  // namespace tensormap
