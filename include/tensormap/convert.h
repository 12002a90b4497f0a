// Converting checkpoints between every format tensormap reads and writes, streamed in
// pieces of at most 16 MiB (dtype conversion included): extra memory stays under 32 MiB
// whatever the sizes of the checkpoint and of its largest tensor. The one exception: a
// torch.save tensor that is a non-contiguous view of its storage is gathered whole first.
//
// Thread-safety: a call runs on the calling thread and touches only its own files.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "tensormap/dtype.h"
#include "tensormap/export.h"
#include "tensormap/format.h"

namespace tensormap {

struct ConvertOptions {
  // Output format; nothing picks it from `out`'s name: *.safetensors(.index.json) gives
  // safetensors, *.pt and *.pth torch.save, anything else tensormap.
  std::optional<Format> format;
  uint64_t alignment = 4096;         // tensormap output only
  std::optional<Dtype> float_dtype;  // convert F16/BF16/F32/F64 tensors to this dtype
  uint64_t shard_size = 0;           // > 0: `out` is an index (*.index.json) and shards go beside it
  bool sync = true;
  // Called after each piece written (at most 16 MiB of a tensor; every tensor at least
  // once) with the bytes of output done so far and the total.
  std::function<void(uint64_t done, uint64_t total, std::string_view name)> progress;
};

struct ConvertResult {
  Format format;
  size_t tensors = 0;
  size_t shards = 0;  // 0 for a single file
  uint64_t bytes = 0;
};

// Reads `in` (any format StateDict::open reads) and writes `out` atomically. Values are
// bit-identical unless float_dtype asks for a conversion. Throws Error on any failure, in
// which case nothing is left at `out`.
TENSORMAP_EXPORT ConvertResult convert(const std::string& in, const std::string& out,
                                       const ConvertOptions& options = {});

}  // namespace tensormap
