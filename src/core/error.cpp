// Names of error kinds, spelled as spec/FORMAT.md spells them.
#include "tensormap/error.h"

namespace tensormap {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::FileTooSmall: return "FileTooSmall";
    case ErrorKind::BadMagic: return "BadMagic";
    case ErrorKind::UnsupportedVersion: return "UnsupportedVersion";
    case ErrorKind::BadAlignment: return "BadAlignment";
    case ErrorKind::BadHeaderSize: return "BadHeaderSize";
    case ErrorKind::Truncated: return "Truncated";
    case ErrorKind::HeaderChecksumMismatch: return "HeaderChecksumMismatch";
    case ErrorKind::TooManyEntries: return "TooManyEntries";
    case ErrorKind::NonZeroReserved: return "NonZeroReserved";
    case ErrorKind::MalformedHeader: return "MalformedHeader";
    case ErrorKind::UnknownDtype: return "UnknownDtype";
    case ErrorKind::BadRank: return "BadRank";
    case ErrorKind::BadName: return "BadName";
    case ErrorKind::ShapeOverflow: return "ShapeOverflow";
    case ErrorKind::LengthMismatch: return "LengthMismatch";
    case ErrorKind::BadOffset: return "BadOffset";
    case ErrorKind::DuplicateName: return "DuplicateName";
    case ErrorKind::TrailingBytes: return "TrailingBytes";
    case ErrorKind::NonZeroPadding: return "NonZeroPadding";
    case ErrorKind::ChecksumMismatch: return "ChecksumMismatch";
    case ErrorKind::SafetensorsTooSmall: return "SafetensorsTooSmall";
    case ErrorKind::SafetensorsHeaderTooLarge: return "SafetensorsHeaderTooLarge";
    case ErrorKind::SafetensorsHeaderPastEnd: return "SafetensorsHeaderPastEnd";
    case ErrorKind::SafetensorsHeaderNotUtf8: return "SafetensorsHeaderNotUtf8";
    case ErrorKind::SafetensorsBadJson: return "SafetensorsBadJson";
    case ErrorKind::SafetensorsBadOffsets: return "SafetensorsBadOffsets";
    case ErrorKind::SafetensorsOverflow: return "SafetensorsOverflow";
    case ErrorKind::SafetensorsSizeMismatch: return "SafetensorsSizeMismatch";
    case ErrorKind::SafetensorsBufferMismatch: return "SafetensorsBufferMismatch";
    case ErrorKind::Io: return "Io";
    case ErrorKind::InvalidArgument: return "InvalidArgument";
    case ErrorKind::NotFound: return "NotFound";
    case ErrorKind::UnsupportedDtype: return "UnsupportedDtype";
    case ErrorKind::ModelMismatch: return "ModelMismatch";
    case ErrorKind::ShardIndexInvalid: return "ShardIndexInvalid";
    case ErrorKind::UnsupportedArchive: return "UnsupportedArchive";
  }
  return "Unknown";
}

Error::Error(ErrorKind kind, const std::string& message)
    : std::runtime_error(message), kind_(kind) {}

}  // namespace tensormap
