// libFuzzer target: the sharded checkpoint index (ShardIndex::parse).
#include <cstdint>
#include <string_view>

#include "tensormap/error.h"
#include "tensormap/sharded.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto index = tensormap::ShardIndex::parse(std::string_view(reinterpret_cast<const char*>(data), size),
                                                    "/fuzz/model.index.json");
    for (const auto& [name, shard] : index.weight_map()) (void)index.shard_path(shard);
  } catch (const tensormap::Error&) {}
  return 0;
}
