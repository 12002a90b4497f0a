// libFuzzer target: the restricted unpickler of torch.save archives (src/core/torch_pickle.h).
// Every storage record exists and is 64 KiB long, so the fuzzer reaches the tensor checks.
#include <cstdint>

#include "../../src/core/torch_save/torch_pickle.h"
#include "tensormap/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto check = [](const std::string&, uint64_t bytes) {
    if (bytes > (1 << 16)) throw tensormap::Error(tensormap::ErrorKind::UnsupportedArchive, "storage too large");
  };
  try {
    const auto document = tensormap::detail::unpickle(data, size, check, "fuzz.pt");
    (void)document;
  } catch (const tensormap::Error&) {}
  return 0;
}
