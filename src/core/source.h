// What a Checkpoint reads from: one implementation per kind of checkpoint (checkpoint.cpp:
// a file and a sharded checkpoint; torch_save_reader.cpp: a torch.save archive). Internal
// to the core.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "format/detect.h"
#include "tensormap/file.h"
#include "tensormap/format.h"
#include "tensormap/sharded.h"
#include "tensormap/tensor_info.h"

namespace tensormap::detail {

struct Source {
  virtual ~Source() = default;
  virtual CheckpointFormat format() const = 0;
  virtual TensorInfo info(size_t i) const = 0;
  // Tensor i's bytes, contiguous, into `dest`.
  virtual void read(size_t i, void* dest) const = 0;
  // Bytes [offset, offset + size) of tensor i's contiguous bytes into `dest` (checked by
  // the caller); false, reading nothing, where that part cannot be read alone (a
  // non-contiguous torch.save view).
  virtual bool read_range(size_t i, uint64_t offset, uint64_t size, void* dest) const = 0;
  // Elements [start, start + length) of tensor i along `dim` (checked by the caller).
  virtual void read_slice(size_t i, int64_t dim, int64_t start, int64_t length, void* dest) const = 0;
  // read() of tensor i, checked against its file's checksum where it has one.
  virtual void read_checked(size_t i, void* dest) const { read(i, dest); }
  virtual void evict(size_t) const {}
  virtual double cached_fraction(size_t) const { return 1.0; }
  virtual void drop_cache(size_t) const {}
  virtual TensorPlacement placement(size_t i) const = 0;
  // Where elements [start, start + length) along `dim` of tensor i lie whole in one file's
  // tensor (a part of a tensor in parts): that file, its entry, and where they begin
  // along `dim` there. Nothing otherwise (placement() says where a whole tensor is).
  virtual std::optional<SlicePlacement> slice_placement(size_t, int64_t, int64_t, int64_t) const {
    return std::nullopt;
  }
  // The earlier tensor whose bytes are tensor i's (Checkpoint::alias_of), or nothing.
  virtual std::optional<size_t> alias_of(size_t) const { return std::nullopt; }
  virtual std::vector<std::pair<std::string, std::string>> metadata() const { return {}; }
  virtual std::vector<std::pair<std::string, std::string>> skipped() const { return {}; }
  virtual std::vector<File> files() const { return {}; }

  size_t size() const { return names.size(); }
  std::optional<size_t> find(std::string_view name) const {
    const auto it = positions.find(name);
    return it == positions.end() ? std::nullopt : std::optional<size_t>(it->second);
  }
  // Fills `positions` from `names`. REQUIRES: names complete and unique.
  void index_names() {
    positions.reserve(names.size());
    for (size_t i = 0; i < names.size(); ++i) positions.emplace(names[i], i);
  }

  std::string path;
  std::vector<std::string> names;
  std::unordered_map<std::string_view, size_t> positions;
};

// A sharded checkpoint whose shard s `open` opens (a local file, or an object beside the
// index's URL). Defined in checkpoint.cpp, as are the others.
using ShardOpener = std::function<std::shared_ptr<const Source>(const ShardIndex& index, uint32_t shard)>;
std::shared_ptr<const Source> open_sharded(ShardIndex index, ShardOpener open);
std::shared_ptr<const Source> open_file_source(File file);
class ByteSource;
// What the first bytes of `bytes` say it is.
Detected detect_opened(const ByteSource& bytes);
// The whole of a shard index, bounded before it is read.
ShardIndex read_shard_index(const ByteSource& bytes);

// A torch.save archive, read through `file` (a Mapping where it is a local file, which
// adds placement and the page-cache operations). Defined in torch_save_reader.cpp.
std::shared_ptr<const Source> open_torch_save(std::shared_ptr<const ByteSource> file);

}  // namespace tensormap::detail
