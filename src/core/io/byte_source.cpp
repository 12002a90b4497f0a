// Bytes in memory as a ByteSource: see byte_source.h.
#include "io/byte_source.h"

#include <algorithm>
#include <cstring>

#include "tensormap/error.h"

namespace tensormap::detail {

void MemoryBytes::read(uint64_t offset, void* dest, uint64_t size, const std::string& what) const {
  if (offset > bytes_.size() || size > bytes_.size() - offset) {
    throw Error(ErrorKind::Truncated, name_ + ": " + what + " ends at " + std::to_string(offset + size) +
                                          " but there are only " + std::to_string(bytes_.size()) + " bytes");
  }
  if (size > 0) std::memcpy(dest, bytes_.data() + offset, static_cast<size_t>(size));
}

std::vector<unsigned char> read_head(const ByteSource& source, uint64_t limit) {
  std::vector<unsigned char> head(static_cast<size_t>(std::min(source.size(), limit)));
  source.read(0, head.data(), head.size(), "the first bytes");
  return head;
}

}  // namespace tensormap::detail
