// One tensor of a file: see tensormap/tensor_entry.h.
#include "tensormap/tensor_entry.h"

namespace tensormap {

uint64_t TensorEntry::element_count() const {
  uint64_t n = 1;
  for (unsigned d = 0; d < rank; ++d) n *= dims[d];  // validated: cannot overflow
  return n;
}

}  // namespace tensormap
