// One tensor of a tensormap or safetensors file, as a File (file.h) describes it, and the
// bytes of one inside the mapping.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include "tensormap/dtype.h"
#include "tensormap/export.h"

namespace tensormap {

// One tensor of the file. The name stays valid as long as the File (or anything holding
// keep_alive()) lives. Safetensors tensors have no checksum (0) and may start at an
// offset that is not a multiple of their element size.
struct TENSORMAP_EXPORT TensorEntry {
  std::string_view name;
  Dtype dtype;
  uint8_t rank;
  std::array<uint64_t, 8> dims;  // only the first `rank` are meaningful
  uint64_t offset;               // absolute offset in the file
  uint64_t byte_length;
  uint64_t checksum;  // XXH3-64 of the bytes
  // An alias (format major 2): the index in tensors() of the earlier tensor whose bytes
  // these are, with the same dtype, shape, offset, length and checksum. Nothing for a
  // tensor with bytes of its own (always, in major 1 and safetensors files).
  std::optional<uint32_t> alias_of;

  // Number of elements: product of the dimensions (1 for rank 0).
  uint64_t element_count() const;
};

// The bytes of one tensor inside the mapping.
struct ByteView {
  const std::byte* data;
  uint64_t size;
};

}  // namespace tensormap
