// The error kinds (names, spelled as spec/FORMAT.md spells them, and groups), and names
// quoted for messages and terminals.
#include "tensormap/error.h"

#include <cstdint>
#include <cstdio>

#include "util/utf8.h"

namespace tensormap {
namespace {

struct KindRow {
  ErrorKind kind;
  const char* name;
  ErrorGroup group;
};

#define TENSORMAP_KIND(kind, group) \
  { ErrorKind::kind, #kind, ErrorGroup::group }
constexpr KindRow kKinds[] = {
    TENSORMAP_KIND(FileTooSmall, FormatRule),
    TENSORMAP_KIND(BadMagic, FormatRule),
    TENSORMAP_KIND(UnsupportedVersion, FormatRule),
    TENSORMAP_KIND(BadAlignment, FormatRule),
    TENSORMAP_KIND(BadHeaderSize, FormatRule),
    TENSORMAP_KIND(Truncated, FormatRule),
    TENSORMAP_KIND(HeaderChecksumMismatch, FormatRule),
    TENSORMAP_KIND(TooManyEntries, FormatRule),
    TENSORMAP_KIND(NonZeroReserved, FormatRule),
    TENSORMAP_KIND(MalformedHeader, FormatRule),
    TENSORMAP_KIND(UnknownDtype, FormatRule),
    TENSORMAP_KIND(BadRank, FormatRule),
    TENSORMAP_KIND(BadName, FormatRule),
    TENSORMAP_KIND(ShapeOverflow, FormatRule),
    TENSORMAP_KIND(LengthMismatch, FormatRule),
    TENSORMAP_KIND(BadOffset, FormatRule),
    TENSORMAP_KIND(BadAlias, FormatRule),
    TENSORMAP_KIND(DuplicateName, FormatRule),
    TENSORMAP_KIND(TrailingBytes, FormatRule),
    TENSORMAP_KIND(NonZeroPadding, FormatRule),
    TENSORMAP_KIND(ChecksumMismatch, FormatRule),
    TENSORMAP_KIND(SafetensorsTooSmall, SafetensorsRule),
    TENSORMAP_KIND(SafetensorsHeaderTooLarge, SafetensorsRule),
    TENSORMAP_KIND(SafetensorsHeaderPastEnd, SafetensorsRule),
    TENSORMAP_KIND(SafetensorsHeaderNotUtf8, SafetensorsRule),
    TENSORMAP_KIND(SafetensorsBadJson, SafetensorsRule),
    TENSORMAP_KIND(SafetensorsBadOffsets, SafetensorsRule),
    TENSORMAP_KIND(SafetensorsOverflow, SafetensorsRule),
    TENSORMAP_KIND(SafetensorsSizeMismatch, SafetensorsRule),
    TENSORMAP_KIND(SafetensorsBufferMismatch, SafetensorsRule),
    TENSORMAP_KIND(ShardIndexInvalid, Checkpoint),
    TENSORMAP_KIND(UnsupportedArchive, Checkpoint),
    TENSORMAP_KIND(Io, Operation),
    TENSORMAP_KIND(InvalidArgument, Operation),
    TENSORMAP_KIND(NotFound, Operation),
    TENSORMAP_KIND(UnsupportedDtype, Operation),
    TENSORMAP_KIND(ModelMismatch, Operation),
    TENSORMAP_KIND(LibTorch, Operation),
    TENSORMAP_KIND(RemoteNotFound, Remote),
    TENSORMAP_KIND(RemoteAccessDenied, Remote),
    TENSORMAP_KIND(RemoteUnreachable, Remote),
    TENSORMAP_KIND(RemoteProtocol, Remote),
    TENSORMAP_KIND(RemoteChanged, Remote),
    TENSORMAP_KIND(RemoteThrottled, Remote),
};
#undef TENSORMAP_KIND

const KindRow* row_of(ErrorKind kind) {
  for (const KindRow& row : kKinds) {
    if (row.kind == kind) return &row;
  }
  return nullptr;
}

}  // namespace

const char* error_kind_name(ErrorKind kind) {
  const KindRow* row = row_of(kind);
  return row ? row->name : "Unknown";
}

ErrorGroup error_group(ErrorKind kind) {
  const KindRow* row = row_of(kind);
  return row ? row->group : ErrorGroup::Operation;
}

std::optional<ErrorKind> error_kind_from_name(std::string_view name) {
  for (const KindRow& row : kKinds) {
    if (name == row.name) return row.kind;
  }
  return std::nullopt;
}

Error::Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}

}  // namespace tensormap

// --- names in messages and on terminals -------------------------------------------------

namespace tensormap {

std::string quoted_name(std::string_view text) {
  using detail::is_valid_utf8;
  constexpr size_t kMaxShown = 80;
  // Only what is shown is checked, so quoting a name costs the same however long it is.
  // A character the cut at kMaxShown would split is left out whole.
  std::string_view shown = text.substr(0, kMaxShown);
  if (text.size() > kMaxShown) {
    size_t back = 0;  // continuation bytes at the end of what is shown
    while (back < 3 && back < shown.size() &&
           (static_cast<unsigned char>(shown[shown.size() - 1 - back]) & 0xC0) == 0x80) {
      ++back;
    }
    if (back < shown.size()) {
      const auto lead = static_cast<unsigned char>(shown[shown.size() - 1 - back]);
      const size_t length = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
      if (length > back + 1) shown = shown.substr(0, shown.size() - 1 - back);
    }
  }
  const bool utf8 = is_valid_utf8(shown);
  std::string out = "'";
  for (const char ch : shown) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7F && c != '\\' && c != '\'') {
      out += ch;
    } else if (c >= 0x80 && utf8) {
      out += ch;  // keep readable non-ASCII names as they are
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
  return cp < 0x20 || (cp >= 0x7F && cp <= 0x9F) || cp == 0x2028 || cp == 0x2029 || (cp >= 0x202A && cp <= 0x202E) ||
         (cp >= 0x2066 && cp <= 0x2069);
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
