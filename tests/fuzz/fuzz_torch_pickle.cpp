// libFuzzer target: the restricted unpickler of torch.save archives (src/torch/pickle.h).
// Storages are zero-filled buffers of the requested size, capped so that the fuzzer
// cannot ask for unbounded memory.
#include <ATen/ATen.h>

#include <cstdint>

#include "../../src/torch/pickle.h"
#include "tensormap/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto load = [](const std::string&, c10::ScalarType type, int64_t numel) {
    if (numel > (1 << 16)) throw tensormap::Error(tensormap::ErrorKind::UnsupportedArchive, "storage too large");
    return at::zeros({numel}, at::TensorOptions().dtype(type)).storage();
  };
  try {
    const auto document = tensormap::detail::unpickle(data, size, load, "fuzz.pt");
    (void)document;
  } catch (const tensormap::Error&) {
  }
  return 0;
}
