// Validation of names and metadata strings (spec rule 14).
#include "format/names.h"

#include <cstdint>
#include <cstdio>

#include "tensormap/format.h"

namespace tensormap::detail {

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
