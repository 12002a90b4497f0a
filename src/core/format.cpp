// Layout arithmetic shared by the reader and the writer.
#include "tensormap/format.h"

#include "bytes.h"

namespace tensormap::format {

std::optional<uint64_t> tensor_byte_length(const uint64_t* shape, unsigned rank,
                                           uint64_t element_size) {
  uint64_t total = element_size;
  bool has_zero = false;
  bool overflow = false;
  for (unsigned d = 0; d < rank; ++d) {
    if (shape[d] > kMaxFileOffset) return std::nullopt;
    if (shape[d] == 0) has_zero = true;
    const auto next = detail::checked_mul(total, shape[d]);
    if (!next || *next > kMaxFileOffset) {
      overflow = true;  // may still be zero-sized if a later dimension is 0
    } else {
      total = *next;
    }
  }
  if (has_zero) return 0;
  if (overflow) return std::nullopt;
  return total;
}

}  // namespace tensormap::format
