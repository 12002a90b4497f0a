// The one error type of tensormap.
//
// Every failure, from a malformed file to a failed write, is reported by throwing
// tensormap::Error. Its kind() says which rule or operation failed (the kinds of the
// format's validation rules are those of spec/FORMAT.md section 9); its what() is a
// one-line message naming the file, the tensor and the numbers that disagree.
//
// Thread-safety: Error is an immutable value; copies may be used from any thread.
#pragma once

#include <stdexcept>
#include <string>

namespace tensormap {

enum class ErrorKind {
  // Validation rules of spec/FORMAT.md, in the order they are checked.
  FileTooSmall,
  BadMagic,
  UnsupportedVersion,
  BadAlignment,
  BadHeaderSize,
  Truncated,
  HeaderChecksumMismatch,
  TooManyEntries,
  NonZeroReserved,
  MalformedHeader,
  UnknownDtype,
  BadRank,
  BadName,
  ShapeOverflow,
  LengthMismatch,
  BadOffset,
  DuplicateName,
  TrailingBytes,
  NonZeroPadding,
  ChecksumMismatch,
  // Validation rules of safetensors files (spec/SAFETENSORS.md), in the order checked.
  SafetensorsTooSmall,        // fewer than 8 bytes
  SafetensorsHeaderTooLarge,  // header length above 100,000,000
  SafetensorsHeaderPastEnd,   // 8 + header length overflows or passes the end of the file
  SafetensorsHeaderNotUtf8,   // the header is not UTF-8
  SafetensorsBadJson,         // not a JSON object of the safetensors shape
  SafetensorsBadOffsets,      // holes, overlaps, or a tensor ending before it begins
  SafetensorsOverflow,        // shape product or byte size overflows
  SafetensorsSizeMismatch,    // data_offsets span differs from shape x dtype size
  SafetensorsBufferMismatch,  // the data does not end exactly at the end of the file
  // Operations.
  Io,               // the operating system refused an open, read, write, sync or rename
  InvalidArgument,  // the caller asked for something the API does not allow
  NotFound,         // no tensor of that name
  UnsupportedDtype, // the dtype has no equivalent in LibTorch 1.13 (U16, U32, U64, F8)
  ShardIndexInvalid,  // a sharded checkpoint's index is malformed or disagrees with a shard
  UnsupportedArchive, // a torch.save archive holds something other than tensors in dicts
  ModelMismatch,    // a checkpoint and a model disagree on names, shapes or dtypes
};

// The kind's name as the spec spells it, e.g. "BadMagic".
const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message);
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace tensormap
