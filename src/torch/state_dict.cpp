// tensormap::StateDict: tensors over a Checkpoint's placements.
#include "tensormap/state_dict.h"
#include "tensormap/remote.h"

#include <ATen/ATen.h>

#include <cstring>

#include "loading.h"
#include "tensor_views.h"
#include "tensormap/error.h"
#include "tensormap/tensor.h"

namespace tensormap {
namespace {

// Bytes [offset, offset + numel * element size) of the entry as a tensor of `sizes`, in
// a mapping of their own (ViewMapping::Own); a copy where they are not aligned to the
// element size, as tensor_view() does.
at::Tensor region_view(const File& file, const TensorEntry& e, uint64_t offset, at::IntArrayRef sizes) {
  const c10::ScalarType type = detail::scalar_type_or_throw(e.dtype, file.path(), e.name);
  const auto options = at::TensorOptions().dtype(type).device(at::kCPU);
  const uint64_t bytes = static_cast<uint64_t>(c10::multiply_integers(sizes)) * c10::elementSize(type);
  if ((e.offset + offset) % c10::elementSize(type) != 0) {
    at::Tensor copy = at::empty(sizes, options);
    file.read(e, offset, copy.data_ptr(), bytes);
    return copy;
  }
  std::shared_ptr<void> region = file.map_region(e, offset, bytes);
  void* data = region.get();
  return at::from_blob(
      data, sizes, [region](void*) mutable { region.reset(); }, options);
}

// Elements [start, start + length) along `dim` of a file's tensor: a zero-copy view when
// the part is one contiguous range of the file (every dimension before `dim` is 1, so
// always for dim 0), in the whole file's mapping or one of its own; otherwise a new
// tensor filled row by row with pread (into memory faulted in ahead, in one system call),
// so that only the needed bytes are read and nothing else of the file enters this process.
// Elements [start, start + length) along `dim` of the tensor `name`, which lie from `at`
// in `file`'s tensor `e` (the tensor itself, or its part there).
at::Tensor slice_of(const Checkpoint& c, std::string_view name, const File& file, const TensorEntry& e, int64_t dim,
                    int64_t start, int64_t at, int64_t length, ViewMapping mapping) {
  std::vector<int64_t> sizes = detail::sizes_of(e);
  uint64_t outer = 1, inner = dtype_size(e.dtype);
  for (int64_t d = 0; d < dim; ++d) outer *= static_cast<uint64_t>(sizes[static_cast<size_t>(d)]);
  for (size_t d = static_cast<size_t>(dim) + 1; d < sizes.size(); ++d) inner *= static_cast<uint64_t>(sizes[d]);
  sizes[static_cast<size_t>(dim)] = length;
  if (outer == 1 || length == 0) {
    if (mapping == ViewMapping::File) return tensor_view(file, e).narrow(dim, at, length);
    return region_view(file, e, static_cast<uint64_t>(at) * inner, sizes);
  }
  const c10::ScalarType type = detail::scalar_type_or_throw(e.dtype, file.path(), e.name);
  at::Tensor out = detail::allocate_populated(sizes, at::TensorOptions().dtype(type));
  c.read(name, dim, start, length, out.data_ptr());
  return out;
}

}  // namespace

StateDict StateDict::open(const std::string& path) { return StateDict(Checkpoint::open(path)); }
StateDict::StateDict(File file) : checkpoint_(std::move(file)) {}
StateDict::StateDict(Checkpoint checkpoint) : checkpoint_(std::move(checkpoint)) {}

at::Tensor StateDict::at(std::string_view name, ViewMapping mapping) const {
  if (is_url(checkpoint_.path())) {  // nothing to map: a tensor of its own, checked where it can be
    const Info info = checkpoint_.info(name);
    at::Tensor out = at::empty(
        info.shape, at::TensorOptions().dtype(detail::scalar_type_or_throw(info.dtype, checkpoint_.path(), name)));
    checkpoint_.read_checked(name, out.data_ptr());
    return out;
  }
  const Checkpoint::Placement p = checkpoint_.placement(name);
  if (p.file) {
    if (mapping == ViewMapping::Own) return region_view(*p.file, *p.entry, 0, detail::sizes_of(*p.entry));
    return tensor_view(*p.file, *p.entry);
  }
  if (!p.storage) {  // a tensor in parts: read, assembled, into memory of its own
    const Info info = checkpoint_.info(name);
    at::Tensor out = detail::allocate_populated(
        info.shape, at::TensorOptions().dtype(detail::scalar_type_or_throw(info.dtype, checkpoint_.path(), name)));
    checkpoint_.read(name, out.data_ptr());
    return out;
  }
  // A torch.save tensor: a possibly strided view of a storage record, which views of the
  // same record share.
  const Info info = checkpoint_.info(name);
  const c10::ScalarType type = detail::scalar_type_or_throw(info.dtype, checkpoint_.path(), name);
  const auto options = at::TensorOptions().dtype(type).device(at::kCPU);
  if (reinterpret_cast<uintptr_t>(p.storage) % c10::elementSize(type) != 0) {
    at::Tensor copy = at::empty(info.shape, options);
    checkpoint_.read(name, copy.data_ptr());
    return copy;
  }
  auto* owner = new std::shared_ptr<const void>(p.owner);
  at::DataPtr data(
      p.storage, owner, [](void* ctx) { delete static_cast<std::shared_ptr<const void>*>(ctx); }, at::Device(at::kCPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), static_cast<size_t>(p.storage_bytes), std::move(data),
                       /*allocator=*/nullptr, /*resizable=*/false);
  at::Tensor out = at::empty({0}, options);
  out.set_(storage, static_cast<int64_t>(p.offset), info.shape, p.strides);  // in bounds: checked on open
  return out;
}

at::Tensor StateDict::raw_bytes(std::string_view name) const {
  at::Tensor out = at::empty({static_cast<int64_t>(checkpoint_.info(name).byte_length)}, at::kByte);
  checkpoint_.read(name, out.data_ptr());
  return out;
}

at::Tensor StateDict::slice(std::string_view name, int64_t dim, int64_t start, int64_t length,
                            ViewMapping mapping) const {
  dim = checkpoint_.checked_slice(name, dim, start, length);
  if (is_url(checkpoint_.path())) {  // the part's bytes only, into a tensor of its own
    const Info info = checkpoint_.info(name);
    std::vector<int64_t> shape = info.shape;
    shape[static_cast<size_t>(dim)] = length;
    at::Tensor out =
        at::empty(shape, at::TensorOptions().dtype(detail::scalar_type_or_throw(info.dtype, checkpoint_.path(), name)));
    checkpoint_.read(name, dim, start, length, out.data_ptr());
    return out;
  }
  if (const auto part = checkpoint_.slice_placement(name, dim, start, length)) {  // in one part's file
    return slice_of(checkpoint_, name, *part->file, *part->entry, dim, start, part->start, length, mapping);
  }
  const Checkpoint::Placement p = checkpoint_.placement(name);
  if (p.file) return slice_of(checkpoint_, name, *p.file, *p.entry, dim, start, start, length, mapping);
  if (!p.storage) {  // a tensor in parts, the slice across them: read into memory of its own
    const Info info = checkpoint_.info(name);
    std::vector<int64_t> shape = info.shape;
    shape[static_cast<size_t>(dim)] = length;
    at::Tensor out = detail::allocate_populated(
        shape, at::TensorOptions().dtype(detail::scalar_type_or_throw(info.dtype, checkpoint_.path(), name)));
    checkpoint_.read(name, dim, start, length, out.data_ptr());
    return out;
  }
  return at(name).narrow(dim, start, length).contiguous();
}

torch::OrderedDict<std::string, at::Tensor> StateDict::to_ordered_dict() const {
  torch::OrderedDict<std::string, at::Tensor> out;
  out.reserve(size());
  for (const std::string& name : keys()) out.insert(name, at(name));
  return out;
}

StateDict::Iterator StateDict::begin() const { return Iterator(this, 0); }
StateDict::Iterator StateDict::end() const { return Iterator(this, size()); }

StateDict::Iterator::value_type StateDict::Iterator::operator*() const {
  const std::string& name = dict_->keys()[index_];
  return {name, dict_->at(name)};
}

}  // namespace tensormap
