// Tensors from a tensormap file: zero-copy views, owned copies, and a lazy state dict.
//
// A view is an at::Tensor whose storage is the file's private (copy-on-write) mapping: no
// byte is read until touched, a write copies only the touched page into this process and
// never reaches the file. Each view holds the mapping alive, so views outlive the File.
//
// LibTorch 1.13 has no U16, U32, U64 or F8 dtypes: such tensors are refused by
// tensor_view/tensor_copy with Error(UnsupportedDtype) and are available as raw bytes.
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

// The LibTorch dtype of a tensormap dtype, or nothing where LibTorch 1.13 has none.
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

// A read-only, dict-like state dict over a file. Opening it reads the header only;
// a tensor is mapped (not read) when asked for, and read when touched.
class StateDict {
 public:
  class Iterator;

  // Opens and validates `path` (see File::open).
  static StateDict open(const std::string& path);
  explicit StateDict(File file);

  size_t size() const;
  bool empty() const;
  bool contains(std::string_view name) const;
  std::vector<std::string> keys() const;  // in file order

  // A zero-copy view of the named tensor. Throws Error(NotFound) or
  // Error(UnsupportedDtype).
  at::Tensor at(std::string_view name) const;
  at::Tensor operator[](std::string_view name) const { return at(name); }

  // Views of every tensor in file order, for APIs that take a name-to-tensor map.
  torch::OrderedDict<std::string, at::Tensor> to_ordered_dict() const;

  Iterator begin() const;
  Iterator end() const;

  const File& file() const { return file_; }

 private:
  File file_;
};

// Iterates (name, view) pairs in file order; each view is made when dereferenced.
class StateDict::Iterator {
 public:
  using value_type = std::pair<std::string_view, at::Tensor>;
  using difference_type = std::ptrdiff_t;
  using iterator_category = std::input_iterator_tag;
  using pointer = void;
  using reference = value_type;

  Iterator(const File* file, size_t index) : file_(file), index_(index) {}
  value_type operator*() const;
  Iterator& operator++() {
    ++index_;
    return *this;
  }
  bool operator==(const Iterator& other) const { return index_ == other.index_; }
  bool operator!=(const Iterator& other) const { return index_ != other.index_; }

 private:
  const File* file_;
  size_t index_;
};

}  // namespace tensormap
