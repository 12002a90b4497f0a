// What a checkpoint tells of one tensor before reading it (TensorInfo), and where its
// elements lie for a zero-copy view (TensorPlacement): Checkpoint::Info and
// Checkpoint::Placement (checkpoint.h).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "tensormap/dtype.h"
#include "tensormap/export.h"

namespace tensormap {

class File;
struct TensorEntry;

// What a tensor of a checkpoint is, known without reading its data (Checkpoint::Info).
struct TensorInfo {
  Dtype dtype;
  std::vector<int64_t> shape;
  uint64_t byte_length;
};

// Where a tensor (Checkpoint::Placement)'s elements lie in memory, for a zero-copy view: in a storage of
// `storage_bytes` bytes at `storage`, in a private (copy-on-write) mapping of the file,
// element 0 at element `offset` of it and the others `strides` elements apart. `owner`
// keeps the mapping alive. A torch.save tensor may be a strided view of a storage that
// other tensors share; a file's tensor is its own contiguous storage. For a tensormap or
// safetensors file (sharded or not), `file` and `entry` give the tensor's File and entry,
// valid while the Checkpoint lives (map_region() maps its own pages); nullptr otherwise.
struct TensorPlacement {
  void* storage;
  uint64_t storage_bytes;
  uint64_t offset;
  std::vector<int64_t> strides;
  std::shared_ptr<const void> owner;
  const File* file = nullptr;
  const TensorEntry* entry = nullptr;
};

// Where a slice of a tensor stored in parts lies whole in one file's tensor
// (Checkpoint::slice_placement): elements from `start` along the slice's dimension there.
struct SlicePlacement {
  const File* file;
  const TensorEntry* entry;
  int64_t start;
};

}  // namespace tensormap
