// Encoding and validation of the tensormap header (spec/FORMAT.md sections 2 to 9).
// Internal to the core: the writer plans and encodes, File validates and parses.
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tensormap/tensor_entry.h"
#include "tensormap/tensor_spec.h"

namespace tensormap::detail {

// Where everything goes in a file about to be written.
struct Layout {
  uint64_t header_size = 0;
  std::vector<uint64_t> offsets;
  std::vector<uint64_t> byte_lengths;          // as recorded: an alias has its target's
  std::vector<std::optional<size_t>> aliases;  // tensormap only: each alias's target
  uint64_t file_size = 0;
};

// Checks the declarations against every rule a reader applies and computes the layout.
// `byte_lengths` (what each tensor receives, 0 for an alias) and `aliases` come from a
// WriteCursor, which checked repeated names, sizes and aliases. Throws
// Error(InvalidArgument) naming `path` and the offending tensor or key.
Layout plan_layout(const std::vector<TensorSpec>& tensors, const std::vector<uint64_t>& byte_lengths,
                   const std::vector<std::optional<size_t>>& aliases, const WriterOptions& options,
                   const std::string& path);

// The safetensors layout and its header bytes, for the writer. Tensors keep their index
// in `tensors`; only their places in the file are sorted by element size.
Layout plan_safetensors_layout(const std::vector<TensorSpec>& tensors, const std::vector<uint64_t>& byte_lengths,
                               const WriterOptions& options, const std::string& path,
                               std::vector<unsigned char>* header);

// The header bytes (header_size of them), checksum included: format 1.0, or 2.0 with the
// aliases feature when some tensor is an alias (its checksum is its target's).
std::vector<unsigned char> encode_header(const std::vector<TensorSpec>& tensors, const WriterOptions& options,
                                         const Layout& layout, const std::vector<uint64_t>& checksums);

// XXH3-64 of the header without its last 8 bytes (section 6).
uint64_t header_checksum(const unsigned char* header, uint64_t header_size);

struct ParsedHeader {
  Format format = Format::Tensormap;
  uint16_t major = 0;
  uint16_t minor = 0;
  uint64_t alignment = 0;
  uint64_t header_size = 0;
  std::vector<TensorEntry> tensors;
  std::vector<std::pair<std::string_view, std::string_view>> metadata;
  std::unordered_map<std::string_view, uint32_t> index;  // name -> position in tensors
  std::deque<std::string> owned;                         // names and metadata that are not in the file verbatim
};

// Validates rules 1 to 20 over the whole file at `base` (file_size bytes) and parses it.
// Views in the result point into `base`. Throws Error of the first broken rule's kind.
ParsedHeader validate_header(const unsigned char* base, uint64_t file_size, const std::string& path);

// The largest safetensors header the reference implementation reads (spec/SAFETENSORS.md).
inline constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;

// Validates a safetensors file as the reference implementation does
// (spec/SAFETENSORS.md) and parses it. Views point into `base` or into `owned`.
ParsedHeader validate_safetensors(const unsigned char* base, uint64_t file_size, const std::string& path);

// "0x" followed by 16 hex digits.
std::string hex64(uint64_t value);

}  // namespace tensormap::detail
