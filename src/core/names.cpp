// Validation of names and metadata strings (spec rule 14).
#include "names.h"

#include <cstdint>
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

namespace {

// Whether the code point a terminal would act on, or that reorders or breaks what it shows.
bool is_control_code_point(uint32_t cp) {
  return cp < 0x20 || (cp >= 0x7F && cp <= 0x9F) || cp == 0x2028 || cp == 0x2029 ||
         (cp >= 0x202A && cp <= 0x202E) || (cp >= 0x2066 && cp <= 0x2069);
}

}  // namespace

std::string printable(std::string_view text) {
  const bool utf8 = detail::is_valid_utf8(text);
  std::string out;
  out.reserve(text.size());
  const auto escape = [&](std::string_view bytes) {
    for (const char byte : bytes) {
      char buf[5];
      std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned char>(byte));
      out += buf;
    }
  };
  for (size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c == '\\') {
      out += "\\\\";
      ++i;
      continue;
    }
    if (c >= 0x80 && !utf8) {
      escape(text.substr(i, 1));
      ++i;
      continue;
    }
    // Valid UTF-8 here: the lead byte gives the sequence's length.
    const size_t length = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    uint32_t cp = length == 1 ? c : length == 2 ? c & 0x1F : length == 3 ? c & 0x0F : c & 0x07;
    for (size_t k = 1; k < length; ++k) cp = (cp << 6) | (static_cast<unsigned char>(text[i + k]) & 0x3F);
    if (is_control_code_point(cp)) {
      escape(text.substr(i, length));
    } else {
      out.append(text.data() + i, length);
    }
    i += length;
  }
  return out;
}

}  // namespace tensormap
