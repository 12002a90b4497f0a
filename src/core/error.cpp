// The error kinds: names, spelled as spec/FORMAT.md spells them, and groups.
#include "tensormap/error.h"

namespace tensormap {
namespace {

struct KindRow {
  ErrorKind kind;
  const char* name;
  ErrorGroup group;
};

#define TENSORMAP_KIND(kind, group) {ErrorKind::kind, #kind, ErrorGroup::group}
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

Error::Error(ErrorKind kind, const std::string& message)
    : std::runtime_error(message), kind_(kind) {}

}  // namespace tensormap
