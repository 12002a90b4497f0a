// libFuzzer target: the zip container of torch.save archives (src/core/zip.h), read from
// memory through the ByteSource seam, then the archive as a checkpoint: its records, its
// pickle and every tensor's bytes.
#include <cstdint>
#include <memory>
#include <vector>

#include "../../src/core/io/byte_source.h"
#include "../../src/core/source.h"
#include "../../src/core/torch_save/zip.h"
#include "tensormap/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tensormap::detail;
  auto bytes = std::make_shared<const MemoryBytes>("fuzz.pt", std::vector<unsigned char>(data, data + size));
  try {
    (void)read_zip_directory(*bytes);
  } catch (const tensormap::Error&) {
    return 0;
  }
  try {
    const auto source = open_torch_save(bytes);
    std::vector<unsigned char> buffer;
    for (size_t i = 0; i < source->size(); ++i) {
      const uint64_t length = source->info(i).byte_length;
      if (length > (uint64_t{64} << 20)) continue;  // a stride-0 view may expand: not this target's memory
      buffer.resize(static_cast<size_t>(length));
      source->read(i, buffer.data());
    }
  } catch (const tensormap::Error&) {}
  return 0;
}
