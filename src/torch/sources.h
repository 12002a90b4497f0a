// Internal to the LibTorch layer: what a StateDict reads from. One implementation per
// kind of checkpoint; all hand out names, what each tensor is, and tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tensormap/tensor.h"

namespace tensormap::detail {

struct StateSource {
  virtual ~StateSource() = default;
  virtual std::string format() const = 0;
  virtual StateDict::Info info(size_t i) const = 0;
  virtual at::Tensor tensor(size_t i) const = 0;
  // Tensor i in a mapping of its own pages (ViewMapping::Own); sources without a file of
  // their own give tensor(i).
  virtual at::Tensor own_view(size_t i) const { return tensor(i); }
  virtual at::Tensor raw_bytes(size_t i) const = 0;
  // Copies tensor i's bytes (info(i).byte_length of them) into `dest`, contiguously.
  virtual void read(size_t i, void* dest) const {
    const at::Tensor bytes = raw_bytes(i);
    if (bytes.numel()) std::memcpy(dest, bytes.data_ptr(), static_cast<size_t>(bytes.numel()));
  }
  virtual void release(size_t) const {}
  // Elements [start, start + length) of tensor i along `dim` (checked by the caller). By
  // default a narrowed view, made contiguous; file sources override it to read only the
  // needed rows with pread when the part is not one contiguous range.
  virtual at::Tensor slice(size_t i, int64_t dim, int64_t start, int64_t length, ViewMapping) const {
    return tensor(i).narrow(dim, start, length).contiguous();
  }
  // Copies the bytes of slice(i, dim, start, length) into `dest`, contiguously; file
  // sources read them with pread.
  virtual void read_slice(size_t i, int64_t dim, int64_t start, int64_t length, void* dest) const {
    const at::Tensor part = slice(i, dim, start, length, ViewMapping::File);
    if (part.numel()) std::memcpy(dest, part.data_ptr(), part.nbytes());
  }
  virtual std::vector<std::pair<std::string, std::string>> metadata() const { return {}; }
  // Values of the checkpoint that are not tensors and were not read: (where, what).
  virtual std::vector<std::pair<std::string, std::string>> skipped_values() const { return {}; }

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

  std::vector<std::string> names;
  std::unordered_map<std::string_view, size_t> positions;
};

// A torch.save archive (its tensors, views into the mapped file). Defined in torch_save.cpp.
std::shared_ptr<const StateSource> open_torch_save(const std::string& path);

// True if the file starts like a zip archive.
bool looks_like_zip(const std::string& path);

}  // namespace tensormap::detail
