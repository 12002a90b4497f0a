// Tensors from a tensormap file: zero-copy views, owned copies, and a lazy state dict.
//
// A view is an at::Tensor whose storage is the file's private (copy-on-write) mapping: no
// byte is read until touched, a write copies only the touched page into this process and
// never reaches the file. Each view holds the mapping alive, so views outlive the File.
//
// LibTorch 1.13 has no U16, U32, U64 or F8 dtypes: there, such tensors are refused by
// tensor_view/tensor_copy with Error(UnsupportedDtype) and are available as raw bytes.
// LibTorch 2.x has them all (F8_E4M3 is float8_e4m3fn, F8_E5M2 float8_e5m2).
//
// Thread-safety: all functions may be called from many threads on one File; the
// returned tensors follow LibTorch's usual rules.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <torch/ordered_dict.h>

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tensormap/dtype.h"
#include "tensormap/file.h"

namespace tensormap {

// The LibTorch dtype of a tensormap dtype, or nothing where this LibTorch has none
// (1.13: U16, U32, U64, F8).
std::optional<c10::ScalarType> to_scalar_type(Dtype dtype);

// The tensormap dtype of a LibTorch dtype. Throws Error(UnsupportedDtype) for dtypes the
// format does not store (quantized types, for example).
Dtype from_scalar_type(c10::ScalarType type);

// A zero-copy view of the entry with its dtype and shape. Where the bytes are not aligned
// to the element size (some safetensors files), an owned, aligned copy instead.
at::Tensor tensor_view(const File& file, const TensorEntry& entry);

// An owned, contiguous copy of the entry.
at::Tensor tensor_copy(const File& file, const TensorEntry& entry);

// A zero-copy U8 view of the entry's bytes, shape [byte_length], for any dtype.
at::Tensor raw_bytes_view(const File& file, const TensorEntry& entry);

namespace detail {
struct StateSource;
}

// Which mapping a zero-copy view of a file lies in.
enum class ViewMapping {
  // The one mapping of the whole file, shared by every view: the default, and free. But
  // on a page fault the kernel maps the whole page-cache folio (up to 2 MiB on Linux 6.x),
  // so touching a view near its edge can make the neighbouring tensors' bytes resident in
  // this process as well, up to a folio at each edge.
  File,
  // A mapping of the view's own pages only (File::map_region): touching it makes nothing
  // else resident. Costs one mapping (VMA) per view, against the kernel's
  // vm.max_map_count. A tensor-parallel load uses it for everything a rank maps. Sources
  // without a file of their own (torch.save archives) give File views.
  Own,
};

// A read-only, dict-like state dict over a checkpoint of any format tensormap reads,
// recognised by content: a tensormap or safetensors file, a sharded checkpoint's index
// (*.index.json), or a torch.save archive. Opening reads the header or index only (a
// torch.save archive's pickle is read, its tensor data is not); shards are mapped when
// one of their tensors is first asked for; a tensor's bytes are read when touched.
class StateDict {
 public:
  class Iterator;

  // What a tensor is, known without reading its data.
  struct Info {
    Dtype dtype;
    std::vector<int64_t> shape;
    uint64_t byte_length;
  };

  static StateDict open(const std::string& path);
  explicit StateDict(File file);

  // "tensormap", "safetensors", "sharded tensormap", "sharded safetensors", "torch.save".
  std::string format() const;
  size_t size() const;
  bool empty() const;
  bool contains(std::string_view name) const;
  std::vector<std::string> keys() const;  // in file (or index) order
  std::vector<std::pair<std::string, std::string>> metadata() const;

  // What a torch.save archive holds beside its tensors and was skipped, as (where, what):
  // a training checkpoint's ("epoch", "the int 3") or ("args", "an object made by
  // argparse.Namespace (not executed)"). Empty for the other formats.
  std::vector<std::pair<std::string, std::string>> skipped() const;

  // Throws Error(NotFound). For a sharded checkpoint, maps the tensor's shard.
  Info info(std::string_view name) const;

  // A view of the named tensor: zero-copy where the format and alignment allow. Throws
  // Error(NotFound) or Error(UnsupportedDtype).
  at::Tensor at(std::string_view name, ViewMapping mapping = ViewMapping::File) const;
  at::Tensor operator[](std::string_view name) const { return at(name); }

  // The tensor's bytes as a flat, owned U8 tensor, for any dtype (F8 and U16 included).
  // From a tensormap or safetensors file it is read with pread (see File::read), so a
  // file truncated meanwhile gives Error(Truncated) rather than SIGBUS.
  at::Tensor raw_bytes(std::string_view name) const;

  // Copies the tensor's bytes (info(name).byte_length of them) into `dest`, the same way.
  void read(std::string_view name, void* dest) const;

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
  // through a mapping: one pread for a contiguous part, one per row otherwise (as
  // slice() reads them). No temporary tensor, so a copy-mode load of a part needs no
  // memory beyond its target. Throws as slice() does, and Error(Truncated) as read().
  void read(std::string_view name, int64_t dim, int64_t start, int64_t length, void* dest) const;

  // Gives the tensor's mapped pages back to the kernel (after a copy of it).
  void release(std::string_view name) const;

  // Views of every tensor in order, for APIs that take a name-to-tensor map.
  torch::OrderedDict<std::string, at::Tensor> to_ordered_dict() const;

  Iterator begin() const;
  Iterator end() const;

 private:
  explicit StateDict(std::shared_ptr<const detail::StateSource> source);
  size_t index_of(std::string_view name) const;
  // The index of `name` and `dim` made non-negative, after checking the slice's bounds.
  size_t checked_slice(std::string_view name, int64_t& dim, int64_t start, int64_t length) const;
  std::shared_ptr<const detail::StateSource> source_;
};

// Iterates (name, view) pairs in order; each view is made when dereferenced.
class StateDict::Iterator {
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
