// Constants and layout arithmetic of the tensormap file format, version 1.
//
// spec/FORMAT.md is the normative text; this header is its one C++ transcription, used
// by both the reader and the writer so the two can never disagree on a rule.
// Everything here is constant or a pure function: safe from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include "tensormap/export.h"

namespace tensormap {

// The single-file formats tensormap reads and writes.
enum class Format {
  Tensormap,    // spec/FORMAT.md
  Safetensors,  // spec/SAFETENSORS.md
  TorchSave,    // Python's torch.save zip archive; written by the LibTorch layer only
};

// "tensormap", "safetensors" or "torch.save".
TENSORMAP_EXPORT const char* format_name(Format format);

// What a path holds: a checkpoint of one file, several, or an archive (checkpoint.h).
enum class CheckpointFormat {
  Tensormap,           // one tensormap file (spec/FORMAT.md)
  Safetensors,         // one safetensors file (spec/SAFETENSORS.md)
  ShardedTensormap,    // an index and tensormap shards
  ShardedSafetensors,  // an index and safetensors shards
  TorchSave,           // a torch.save zip archive, or LibTorch's (torch::save, OutputArchive)
};

// "tensormap", "safetensors", "sharded tensormap", "sharded safetensors", "torch.save".
TENSORMAP_EXPORT const char* format_name(CheckpointFormat format);
TENSORMAP_EXPORT bool is_sharded(CheckpointFormat format);

// The format a user names: format_name()'s spellings, and "torch" for torch.save. Nothing
// for any other name.
TENSORMAP_EXPORT std::optional<Format> format_from_name(std::string_view name);

// The format a destination's name asks for, without its ".index.json" (a sharded
// checkpoint's index): *.safetensors gives Safetensors, *.pt and *.pth TorchSave,
// anything else Tensormap.
TENSORMAP_EXPORT Format format_for_path(std::string_view path);

}  // namespace tensormap

namespace tensormap::format {

inline constexpr unsigned char kMagic[8] = {0x89, 'T', 'M', 'A', 'P', '\r', '\n', 0x1A};
// Major 1 is the base format; major 2 adds the `features` field (the preamble's bytes 40
// to 48, reserved in major 1) and each tensor record's `flags` (its bytes 6 to 8). A
// writer writes major 1 whenever it uses no feature, so that every reader reads the file.
inline constexpr uint16_t kMajorVersion = 1;
inline constexpr uint16_t kMaxMajorVersion = 2;
inline constexpr uint16_t kMinorVersion = 0;
// Feature bits (major 2): a reader refuses a file with a bit it does not know.
inline constexpr uint64_t kFeatureAliases = 1;  // records may be aliases (section 3.1)
inline constexpr uint64_t kKnownFeatures = kFeatureAliases;
// Flag bits of a tensor record (major 2 with kFeatureAliases).
inline constexpr uint16_t kFlagAlias = 1;  // the record names the bytes of an earlier one

inline constexpr uint64_t kPreambleSize = 48;
inline constexpr uint64_t kChecksumSize = 8;
inline constexpr uint64_t kMinHeaderSize = kPreambleSize + kChecksumSize;  // 56
inline constexpr uint64_t kMaxHeaderSize = uint64_t{1} << 30;
inline constexpr uint64_t kMaxTensorCount = uint64_t{1} << 24;
inline constexpr uint64_t kMaxMetadataCount = uint64_t{1} << 20;
inline constexpr uint64_t kMaxNameLength = 4096;
inline constexpr unsigned kMaxRank = 8;
inline constexpr uint64_t kMinAlignment = 64;
inline constexpr uint64_t kMaxAlignment = uint64_t{1} << 20;
inline constexpr uint64_t kDefaultAlignment = 4096;
// Offsets, lengths and file sizes stay below 2^63 so they fit a signed 64-bit off_t.
inline constexpr uint64_t kMaxFileOffset = (uint64_t{1} << 63) - 1;

inline constexpr uint64_t kTensorRecordFixedSize = 32;
inline constexpr uint64_t kMinTensorRecordSize = 40;
inline constexpr uint64_t kMetadataRecordFixedSize = 8;
inline constexpr uint64_t kMinMetadataRecordSize = 16;

inline constexpr bool is_valid_alignment(uint64_t a) {
  return a >= kMinAlignment && a <= kMaxAlignment && (a & (a - 1)) == 0;
}

// round_up(x, a) for a power of two a; nothing if the result does not fit below 2^63.
inline constexpr std::optional<uint64_t> round_up(uint64_t x, uint64_t a) {
  if (x > kMaxFileOffset - (a - 1)) return std::nullopt;
  return (x + a - 1) & ~(a - 1);
}

inline constexpr uint64_t pad8(uint64_t x) { return (x + 7) & ~uint64_t{7}; }

// Size of a tensor record with this rank and name length (section 3).
inline constexpr uint64_t tensor_record_size(unsigned rank, uint64_t name_length) {
  return kTensorRecordFixedSize + 8 * uint64_t{rank} + pad8(name_length);
}

// Size of a metadata record (section 4).
inline constexpr uint64_t metadata_record_size(uint64_t key_length, uint64_t value_length) {
  return kMetadataRecordFixedSize + pad8(key_length + value_length);
}

// Byte length of a tensor: product(shape) * element size, or nothing on overflow past
// kMaxFileOffset (rule 15).
TENSORMAP_EXPORT std::optional<uint64_t> tensor_byte_length(const uint64_t* shape, unsigned rank,
                                                            uint64_t element_size);

}  // namespace tensormap::format
