// tensormap::StateDict: a checkpoint of any format tensormap reads, as a read-only,
// dict-like map of LibTorch tensors.
//
// It is a Checkpoint (checkpoint.h: format recognised by content, lazy opening, pread
// reads) that hands out at::Tensor views: zero-copy over the file's private
// (copy-on-write) mapping where the format and alignment allow, so a tensor's bytes are
// read when touched.
//
// Writes into views. The views of one StateDict (or of one File) lie in one private,
// copy-on-write mapping of the file: a write into a view copies the touched pages once,
// for that mapping, and every other view of the same StateDict sees it, as do later at()
// calls and every model map-loaded from it with load(module, state_dict), which share
// their weights' pages with each other. The file never changes, nor do the views of
// another StateDict. This is deliberate: models loaded from one StateDict share one copy
// of the weights. For models that train (or otherwise write their weights) independently,
// load each from its path (each such load maps the file privately) or from a StateDict
// of its own; or load with LoadMode::Copy. (Test: LoadMap.ModelsLoadedFromOneStateDictShareTheirPagesAndLoadsByPathDoNot.)
//
// Thread-safety: immutable after open; all const methods may be called from many
// threads. The returned tensors follow LibTorch's usual rules.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/ordered_dict.h>

#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tensormap/checkpoint.h"
#include "tensormap/export.h"
#include "tensormap/file.h"

namespace tensormap {

// Which mapping a zero-copy view of a file lies in.
enum class ViewMapping {
  // The one mapping of the whole file, shared by every view: the default, and free. But
  // on a page fault the kernel maps the whole page-cache folio (up to 2 MiB on Linux 6.x),
  // so touching a view near its edge can make the neighbouring tensors' bytes resident in
  // this process as well, up to a folio at each edge.
  File,
  // A mapping of the view's own pages only (File::map_region): touching it makes nothing
  // else resident. Costs one mapping (VMA) per view, against the kernel's
  // vm.max_map_count. A tensor-parallel load uses it for everything a rank maps.
  // torch.save archives, whose tensors have no file of their own, give File views.
  Own,
};

class TENSORMAP_EXPORT StateDict {
 public:
  class Iterator;
  using Info = Checkpoint::Info;

  static StateDict open(const std::string& path);
  explicit StateDict(File file);
  explicit StateDict(Checkpoint checkpoint);

  // The checkpoint underneath: its format, path, placement of tensors.
  const Checkpoint& checkpoint() const { return checkpoint_; }
  CheckpointFormat format() const { return checkpoint_.format(); }
  size_t size() const { return checkpoint_.size(); }
  bool empty() const { return checkpoint_.empty(); }
  bool contains(std::string_view name) const { return checkpoint_.contains(name); }
  const std::vector<std::string>& keys() const { return checkpoint_.keys(); }  // in file (or index) order
  std::vector<std::pair<std::string, std::string>> metadata() const { return checkpoint_.metadata(); }
  // See Checkpoint::skipped.
  std::vector<std::pair<std::string, std::string>> skipped() const { return checkpoint_.skipped(); }

  // Throws Error(NotFound). For a sharded checkpoint, opens the tensor's shard.
  Info info(std::string_view name) const { return checkpoint_.info(name); }

  // A view of the named tensor: zero-copy where the format and alignment allow. Throws
  // Error(NotFound), or Error(UnsupportedDtype) for a dtype this LibTorch lacks (1.13:
  // U16, U32, U64, F8), whose bytes raw_bytes() gives.
  at::Tensor at(std::string_view name, ViewMapping mapping = ViewMapping::File) const;
  at::Tensor operator[](std::string_view name) const { return at(name); }

  // The tensor's bytes as a flat, owned U8 tensor, for any dtype, read with pread (see
  // Checkpoint::read): a file truncated meanwhile gives Error(Truncated), not SIGBUS.
  at::Tensor raw_bytes(std::string_view name) const;

  // Copies the tensor's bytes (info(name).byte_length of them) into `dest`, the same way.
  void read(std::string_view name, void* dest) const { checkpoint_.read(name, dest); }

  // Elements [start, start + length) of the tensor along `dim` (negative counts from the
  // end). Zero-copy when the part is one contiguous range of the file: always along dim
  // 0, or when every earlier dimension is 1; only the part's pages are ever touched, and
  // with ViewMapping::Own only they can become resident in this process.
  // Otherwise a new contiguous tensor holding only the part: from a tensormap or
  // safetensors file (sharded or not) each of its rows is read with pread, so the rest of
  // the tensor never enters this process. Throws Error(NotFound), Error(InvalidArgument)
  // for a dimension or range out of bounds, Error(UnsupportedDtype).
  at::Tensor slice(std::string_view name, int64_t dim, int64_t start, int64_t length,
                   ViewMapping mapping = ViewMapping::File) const;

  // Copies the bytes of slice(name, dim, start, length), contiguous, into `dest`, never
  // through a mapping: see Checkpoint::read. No temporary tensor, so a copy-mode load of
  // a part needs no memory beyond its target.
  void read(std::string_view name, int64_t dim, int64_t start, int64_t length, void* dest) const {
    checkpoint_.read(name, dim, start, length, dest);
  }

  // See Checkpoint::read_checked.
  void read_checked(std::string_view name, void* dest) const { checkpoint_.read_checked(name, dest); }

  // Evicts the tensor's mapped pages from this process (after a copy of it).
  void evict(std::string_view name) const { checkpoint_.evict(name); }

  // See Checkpoint::cached_fraction and Checkpoint::drop_cache.
  double cached_fraction(std::string_view name) const { return checkpoint_.cached_fraction(name); }
  void drop_cache(std::string_view name) const { checkpoint_.drop_cache(name); }

  // Views of every tensor in order, for APIs that take a name-to-tensor map.
  torch::OrderedDict<std::string, at::Tensor> to_ordered_dict() const;

  Iterator begin() const;
  Iterator end() const;

 private:
  Checkpoint checkpoint_;
};

// Iterates (name, view) pairs in order; each view is made when dereferenced.
class TENSORMAP_EXPORT StateDict::Iterator {
 public:
  using value_type = std::pair<std::string, at::Tensor>;
  using difference_type = std::ptrdiff_t;
  using iterator_category = std::input_iterator_tag;
  using pointer = void;
  using reference = value_type;

  Iterator(const StateDict* dict, size_t index) : dict_(dict), index_(index) {}
  value_type operator*() const;
  Iterator& operator++() {
    ++index_;
    return *this;
  }
  bool operator==(const Iterator& other) const { return index_ == other.index_; }
  bool operator!=(const Iterator& other) const { return index_ != other.index_; }

 private:
  const StateDict* dict_;
  size_t index_;
};

}  // namespace tensormap
