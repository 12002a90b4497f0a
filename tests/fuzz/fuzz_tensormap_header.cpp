// libFuzzer target: the tensormap header validator (spec/FORMAT.md rules 1 to 20), and
// verify's data checks when the header passes. Any input must give a result or an Error.
#include <cstdint>
#include <cstring>
#include <vector>

#include "../../src/core/format/header.h"
#include "tensormap/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<unsigned char> copy(data, data + size);  // aligned like a mapping would be
  try {
    const auto header = tensormap::detail::validate_header(copy.data(), copy.size(), "fuzz.tmap");
    for (const auto& e : header.tensors) {
      volatile unsigned char sink = 0;
      if (e.byte_length) sink = copy[e.offset + e.byte_length - 1];  // in bounds by validation
      (void)sink;
    }
  } catch (const tensormap::Error&) {}
  return 0;
}
