// Sharded checkpoints: tensors spread over several files, and an index JSON that maps
// every tensor name to its file, in the convention of Hugging Face checkpoints:
//
//   model.safetensors.index.json   {"metadata": {"total_size": N},
//                                   "weight_map": {"fc.weight": "model-00001-of-00002.safetensors", ...}}
//   model-00001-of-00002.safetensors, model-00002-of-00002.safetensors
//
// The same layout serves tensormap shards (model.tmap.index.json, model-00001-of-00002.tmap).
// Shards are named by plain file names and live beside the index.
//
// Thread-safety: a ShardIndex is immutable; a ShardedWriter is used by one thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tensormap/writer.h"

namespace tensormap {

// A generous bound on the size of an index file.
inline constexpr uint64_t kMaxShardIndexBytes = uint64_t{256} << 20;

class TENSORMAP_EXPORT ShardIndex {
 public:
  // Reads and validates an index file. Throws Error(ShardIndexInvalid) for anything but a
  // JSON object whose "weight_map" maps names to plain file names, Error(Io) if unreadable.
  static ShardIndex open(const std::string& path);

  // The same validation over index text already in memory; `path` names the index in
  // errors and places the shards.
  static ShardIndex parse(std::string_view text, const std::string& path);

  const std::string& path() const { return path_; }
  // Distinct shard file names in order of first appearance.
  const std::vector<std::string>& shard_files() const { return shard_files_; }
  // Every tensor with the number of its shard, in the index's order.
  const std::vector<std::pair<std::string, uint32_t>>& weight_map() const { return weight_map_; }
  // "total_size" of the metadata, or 0 when absent.
  uint64_t total_size() const { return total_size_; }

  // A tensor stored in parts, one per file, that lie side by side along `dim` in the
  // order of `files` (a distributed save's split tensors: spec/FORMAT.md, section 16).
  // Each file holds its part under the tensor's own name.
  struct Parts {
    std::string name;
    int64_t dim = 0;
    std::vector<int64_t> shape;   // the whole tensor's
    std::vector<uint32_t> files;  // shard numbers, in order along dim
  };
  // The "parts" object of the index, in its order (after the weight_map's tensors).
  const std::vector<Parts>& parts() const { return parts_; }
  // The path of shard `i` (beside the index).
  std::string shard_path(uint32_t i) const;

 private:
  std::string path_;
  std::vector<std::string> shard_files_;
  std::vector<std::pair<std::string, uint32_t>> weight_map_;
  std::vector<Parts> parts_;
  uint64_t total_size_ = 0;
};

// Streams tensors into shards of at most `max_shard_bytes` of tensor data each (a tensor
// larger than that gets a shard of its own), then writes the index. The format of the
// shards is options.format. The index path must end in ".index.json"; shards are named
// after it: model.safetensors.index.json -> model-00001-of-00003.safetensors.
//
// Publishing is atomic: at every moment, the index at the path names either the complete
// old set of shards or the complete new set. Every shard is written as a new file and
// moved into place on commit() under a name the index being replaced does not use (the
// usual names where free; otherwise with a generation tag, model-00001-of-00002.b.tmap,
// so saves of the same shape alternate between the two); then the index is replaced
// atomically; then the shards of the old index that the new one does not name are
// removed. A failure before commit() leaves nothing behind; a crash during commit() may
// leave new shards that no index names, or old ones after the switch, never a mix.
class TENSORMAP_EXPORT ShardedWriter final : public FormatWriter {
 public:
  ShardedWriter(std::string index_path, std::vector<TensorSpec> tensors, uint64_t max_shard_bytes,
                WriterOptions options = {});

  size_t shard_count() const;
};

// A distributed save's files (spec/FORMAT.md, section 16): beside the index
// "<stem>.tmap.index.json", rank r of n writes "<stem>-<id>-rank<r>-of-<n>.tmap", where
// <id> (16 hexadecimal digits) is one save's and no other's. The index, written last by
// one rank, is the commit.
struct DistributedIndex {
  std::vector<std::pair<std::string, std::string>> whole;  // a tensor kept whole, and its file
  struct Split {
    std::string name;
    int64_t dim = 0;
    std::vector<int64_t> shape;      // the whole tensor's
    std::vector<std::string> files;  // its parts' files, in order along dim
  };
  std::vector<Split> split;
  uint64_t total_size = 0;  // bytes of all the tensors
};

// The name of rank `rank`'s file of the save `id` of the index at `index_path` (which must
// end in ".tmap.index.json": Error(InvalidArgument) otherwise).
TENSORMAP_EXPORT std::string distributed_file_name(const std::string& index_path, const std::string& id, int rank,
                                                   int world);

// Writes the index at `index_path` atomically (durably with `sync`): the commit. Then
// removes the files earlier saves of this index wrote beside it (by their names) that it
// does not name: the files of the checkpoint it replaces, and those of saves that never
// committed. Throws Error(Io) if the index cannot be written (nothing changes then).
TENSORMAP_EXPORT void publish_distributed_index(const std::string& index_path, const DistributedIndex& index,
                                                bool sync);

}  // namespace tensormap
