// tensormap::Checkpoint: any checkpoint tensormap reads, as a lazy, read-only dict of
// tensors, without LibTorch.
//
// A checkpoint is one tensormap or safetensors file, a sharded checkpoint (an index,
// *.index.json, naming the shard of every tensor), or a torch.save archive. Its format is
// recognised once, from its content (detect_format), never from its name. Opening reads
// the header, the index or the archive's pickle only; shards are opened when one of their
// tensors is first asked for; tensor bytes are read only by read() (with pread, so a file
// that shrinks meanwhile gives Error(Truncated), never SIGBUS) or when a caller touches a
// placement().
//
// The LibTorch layer's StateDict (state_dict.h) is this, with tensors.
//
// Thread-safety: a Checkpoint is immutable after open; all const methods may be called
// from many threads. Copies share one source.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tensormap/dtype.h"
#include "tensormap/export.h"
#include "tensormap/file.h"
#include "tensormap/format.h"
#include "tensormap/remote.h"
#include "tensormap/tensor_info.h"

namespace tensormap {

// The format of the file at `path`, from its first bytes and its size (spec/FORMAT.md
// section 13 lists the facts). A sharded checkpoint's index is reported as
// ShardedTensormap or ShardedSafetensors from its first shard (an empty index from its
// name). A file of no known format is reported as Tensormap, so that opening it names
// the first tensormap rule it breaks. Throws Error(Io) if the file cannot be read.
TENSORMAP_EXPORT CheckpointFormat detect_format(const std::string& path);

namespace detail {
struct Source;
}

class TENSORMAP_EXPORT Checkpoint {
 public:
  // What a tensor is, and where its elements lie in memory (tensor_info.h).
  using Info = TensorInfo;
  using Placement = TensorPlacement;

  // Opens the checkpoint at `path`, whatever its format. Throws the Error of the first
  // rule it breaks, Error(Io) if it cannot be read. `path` may be an http://, https://
  // or s3:// URL (tensormap/remote.h), read with RemoteOptions::from_environment().
  static Checkpoint open(const std::string& path);
  // The checkpoint at `url`, read with `options`. Throws Error(InvalidArgument) where
  // `url` is not a URL, and an Error of the Remote group where it cannot be read.
  static Checkpoint open(const std::string& url, const RemoteOptions& options);
  explicit Checkpoint(File file);

  const std::string& path() const;
  CheckpointFormat format() const;
  size_t size() const;
  bool empty() const;
  bool contains(std::string_view name) const;
  // Names in file (or index) order.
  const std::vector<std::string>& keys() const;
  std::vector<std::pair<std::string, std::string>> metadata() const;

  // What a torch.save archive holds beside its tensors and was skipped, as (where, what):
  // a training checkpoint's ("epoch", "the int 3") or ("args", "an object made by
  // argparse.Namespace (not executed)"). Empty for the other formats.
  std::vector<std::pair<std::string, std::string>> skipped() const;

  // Throws Error(NotFound) naming the checkpoint. For a sharded checkpoint, opens the
  // tensor's shard.
  Info info(std::string_view name) const;
  // The name of the earlier tensor whose bytes are this tensor's (a tied weight), or
  // nothing: a tensormap file's alias (format 2.0), a torch.save tensor that is the very
  // view of an earlier one (same storage, offset, shape and strides). Throws
  // Error(NotFound) as info() does.
  std::optional<std::string> alias_of(std::string_view name) const;

  // Copies the tensor's bytes, contiguous (info(name).byte_length of them), into `dest`,
  // with pread.
  void read(std::string_view name, void* dest) const;

  // read(), checked against the XXH3-64 the tensor's file records as it is read (see
  // File::read_checked): Error(ChecksumMismatch) names the file and the tensor. The
  // formats without checksums (safetensors, torch.save) are read unchecked.
  void read_checked(std::string_view name, void* dest) const;

  // Streams the tensor's bytes, contiguous, through `buffer` (`buffer_size` bytes):
  // `consume(data, size)` gets successive pieces, in order, each the most whole elements
  // that fit the buffer (the last fewer), read with pread as read() does. Memory beyond
  // the buffer: none, whatever the tensor's size, except for a torch.save tensor that is
  // a non-contiguous view of its storage, which is gathered whole first. Throws what
  // read() throws, Error(InvalidArgument) for a buffer smaller than one element, and
  // whatever `consume` throws.
  void read_chunks(std::string_view name, void* buffer, uint64_t buffer_size,
                   const std::function<void(const void* data, uint64_t size)>& consume) const;

  // Copies elements [start, start + length) of the tensor along `dim` (negative counts
  // from the end), contiguous, into `dest`: one pread for a contiguous part, one per row
  // otherwise. Throws Error(InvalidArgument) for a dimension or range out of bounds.
  void read(std::string_view name, int64_t dim, int64_t start, int64_t length, void* dest) const;

  // The dimension `dim` made non-negative, after checking that the slice lies inside the
  // tensor. Throws Error(NotFound) or Error(InvalidArgument).
  int64_t checked_slice(std::string_view name, int64_t dim, int64_t start, int64_t length) const;

  // Drops the tensor's pages from this process's mapping (MADV_DONTNEED), after a copy of
  // it: see File::evict.
  void evict(std::string_view name) const;

  // The fraction (0 to 1) of the tensor's pages the page cache holds now, and a request
  // to drop them from it: see File::cached_fraction and File::drop_cache. A torch.save
  // tensor's are those of its whole storage.
  double cached_fraction(std::string_view name) const;
  void drop_cache(std::string_view name) const;

  // Where the tensor lies in the mapping. Throws Error(NotFound). A tensor stored in parts
  // (a distributed save's) lies in no one place: storage and file are null.
  Placement placement(std::string_view name) const;

  // Where elements [start, start + length) along `dim` (non-negative, checked) of a tensor
  // stored in parts lie whole in one of its files: that file's tensor, and where they
  // begin there. Nothing for any other slice or tensor.
  std::optional<SlicePlacement> slice_placement(std::string_view name, int64_t dim, int64_t start,
                                                int64_t length) const;

  // The tensormap and safetensors files the checkpoint consists of: the file itself, or
  // every shard (all opened now). Empty for a torch.save archive.
  std::vector<File> files() const;

 private:
  explicit Checkpoint(std::shared_ptr<const detail::Source> source);
  size_t index_of(std::string_view name) const;
  std::shared_ptr<const detail::Source> source_;
};

}  // namespace tensormap
