// Checking a whole checkpoint, whatever its format: the one rule for what "verify" means,
// which the command line and the Python package present.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tensormap/checkpoint.h"
#include "tensormap/error.h"
#include "tensormap/export.h"

namespace tensormap {

struct TENSORMAP_EXPORT VerifyReport {
  std::string path;
  CheckpointFormat format = CheckpointFormat::Tensormap;
  size_t tensors = 0;
  size_t files = 0;    // tensormap and safetensors files checked: 1, every shard, or 0 (torch.save)
  uint64_t bytes = 0;  // tensor bytes in those files
  // Whether every file checked has checksums (tensormap files), so that every tensor's
  // bytes and every padding byte were checked, not only the structure.
  bool checksums = false;
  // One Error per bad tensor or padding region, file by file in file order; empty when
  // the checkpoint is sound.
  std::vector<Error> problems;

  bool ok() const { return problems.empty(); }
};

// Opens the checkpoint at `path` (checking every structural rule of its format, every
// shard, and that every name of a sharded index is in its shard), then checks every
// tensor's checksum and every padding byte of each tensormap file
// (File::find_corruption). Throws what opening throws; problems found after opening are
// in the report.
TENSORMAP_EXPORT VerifyReport verify_checkpoint(const std::string& path);

}  // namespace tensormap
