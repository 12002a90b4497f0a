// The one error type of tensormap.
//
// Every failure, from a malformed file to a failed write, is reported by throwing
// tensormap::Error. Its kind() says which rule or operation failed (the kinds of the
// format's validation rules are those of spec/FORMAT.md section 9); its what() is a
// one-line message naming the file, the tensor and the numbers that disagree.
//
// Thread-safety: Error is an immutable value; copies may be used from any thread.
#pragma once

#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

#include "tensormap/export.h"

namespace tensormap {

// Every kind, in four groups (ErrorGroup). Names are stable: they are what the command
// line prints and what load_distributed sends between ranks; the numeric values are not.
enum class ErrorKind {
  // FormatRule: the validation rules of spec/FORMAT.md, in the order they are checked.
  FileTooSmall,
  BadMagic,
  UnsupportedVersion,
  BadAlignment,
  BadHeaderSize,
  Truncated,  // also: a file that shrank while it was open, in any format
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
  BadAlias,  // an alias record whose target is missing or differs (major 2)
  DuplicateName,
  TrailingBytes,
  NonZeroPadding,
  ChecksumMismatch,
  // SafetensorsRule: the rules of spec/SAFETENSORS.md, in the order they are checked.
  SafetensorsTooSmall,        // fewer than 8 bytes
  SafetensorsHeaderTooLarge,  // header length above 100,000,000
  SafetensorsHeaderPastEnd,   // 8 + header length overflows or passes the end of the file
  SafetensorsHeaderNotUtf8,   // the header is not UTF-8
  SafetensorsBadJson,         // not a JSON object of the safetensors shape
  SafetensorsBadOffsets,      // holes, overlaps, or a tensor ending before it begins
  SafetensorsOverflow,        // shape product or byte size overflows
  SafetensorsSizeMismatch,    // data_offsets span differs from shape x dtype size
  SafetensorsBufferMismatch,  // the data does not end exactly at the end of the file
  // Checkpoint: the other checkpoints tensormap reads.
  ShardIndexInvalid,   // a sharded checkpoint's index is malformed or disagrees with a shard
  UnsupportedArchive,  // a torch.save archive that is malformed or holds what tensormap cannot read
  // Operation: what a caller asked for, and what the system answered.
  Io,                // the operating system refused an open, read, write, sync or rename
  InvalidArgument,   // the caller asked for something the API does not allow
  NotFound,          // no tensor of that name (the message names the checkpoint)
  UnsupportedDtype,  // the dtype has no equivalent in this LibTorch (1.13: U16, U32, U64, F8)
  ModelMismatch,     // a checkpoint and a model disagree on names, shapes or dtypes
  LibTorch,          // LibTorch itself failed (a c10::Error), for example in a collective
  // Remote: a checkpoint at an http://, https:// or s3:// URL (tensormap/remote.h).
  RemoteNotFound,      // no object at the URL (404)
  RemoteAccessDenied,  // the server refused the credentials, or their absence (401, 403)
  RemoteUnreachable,   // no answer: a bad host, a refused, reset or stalled connection
  RemoteProtocol,      // an answer tensormap cannot use: Range ignored, a short body, another status
  RemoteChanged,       // the object changed between two requests (its ETag or Last-Modified)
  RemoteThrottled,     // the server still asked to slow down (429, 503) after every retry
};
inline constexpr ErrorKind kLastErrorKind = ErrorKind::RemoteThrottled;

enum class ErrorGroup { FormatRule, SafetensorsRule, Checkpoint, Operation, Remote };

TENSORMAP_EXPORT ErrorGroup error_group(ErrorKind kind);

// `text` quoted for an error message: printable ASCII kept, everything else escaped,
// long text shortened. Safe for hostile bytes (a name read from an untrusted file).
TENSORMAP_EXPORT std::string quoted_name(std::string_view text);

// `text` (a tensor name, a metadata value: bytes from a file) as a terminal may show it,
// whole and unquoted: every byte that could drive the terminal or forge a line (C0 and
// C1 control characters, DEL, bidirectional overrides, line and paragraph separators,
// and all bytes of text that is not UTF-8) is written as \xNN, and a backslash as \\, so
// that the result is unambiguous. Clean text comes back unchanged. For human-readable
// output; JSON output carries the exact bytes instead.
TENSORMAP_EXPORT std::string printable(std::string_view text);

// The kind's name as the spec spells it, e.g. "BadMagic".
TENSORMAP_EXPORT const char* error_kind_name(ErrorKind kind);

// The kind of this name (as error_kind_name spells it), or nothing.
TENSORMAP_EXPORT std::optional<ErrorKind> error_kind_from_name(std::string_view name);

class TENSORMAP_EXPORT Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message);
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace tensormap
