// Tensors over a File's mapping, and the lazy StateDict.
#include "tensormap/tensor.h"

#include <ATen/ATen.h>

#include <cstring>
#include <fstream>
#include <mutex>
#include <torch/version.h>

#include "loading.h"
#include "sources.h"
#include "tensormap/error.h"
#include "tensormap/sharded.h"

namespace tensormap {
namespace {

std::vector<int64_t> sizes_of(const TensorEntry& entry) {
  // Validation guarantees every dimension is below 2^63.
  return std::vector<int64_t>(entry.dims.begin(), entry.dims.begin() + entry.rank);
}

c10::ScalarType scalar_type_or_throw(const File& file, const TensorEntry& entry) {
  if (auto type = to_scalar_type(entry.dtype)) return *type;
  throw Error(ErrorKind::UnsupportedDtype,
              file.path() + ": tensor '" + std::string(entry.name) + "' has dtype " +
                  std::string(dtype_name(entry.dtype)) +
                  ", which LibTorch " TORCH_VERSION " cannot represent; read it with raw_bytes_view");
}

// A view of the entry's bytes; a copy where they are not aligned to the element size
// (possible in safetensors files), so that no misaligned typed pointer is ever made.
at::Tensor view_as(const File& file, const TensorEntry& entry, c10::ScalarType type,
                   at::IntArrayRef sizes) {
  const auto options = at::TensorOptions().dtype(type).device(at::kCPU);
  void* data = file.cow_data(entry);
  if (reinterpret_cast<uintptr_t>(data) % c10::elementSize(type) != 0) {
    at::Tensor copy = at::empty(sizes, options);
    std::memcpy(copy.data_ptr(), data, entry.byte_length);
    return copy;
  }
  auto owner = file.keep_alive();
  return at::from_blob(data, sizes, [owner](void*) mutable { owner.reset(); }, options);
}

}  // namespace

std::optional<c10::ScalarType> to_scalar_type(Dtype dtype) {
  switch (dtype) {
    case Dtype::BOOL: return at::kBool;
    case Dtype::U8: return at::kByte;
    case Dtype::I8: return at::kChar;
    case Dtype::I16: return at::kShort;
    case Dtype::I32: return at::kInt;
    case Dtype::I64: return at::kLong;
    case Dtype::F16: return at::kHalf;
    case Dtype::BF16: return at::kBFloat16;
    case Dtype::F32: return at::kFloat;
    case Dtype::F64: return at::kDouble;
    case Dtype::C64: return at::kComplexFloat;
    case Dtype::C128: return at::kComplexDouble;
#if TORCH_VERSION_MAJOR >= 2
    case Dtype::U16: return at::kUInt16;
    case Dtype::U32: return at::kUInt32;
    case Dtype::U64: return at::kUInt64;
    case Dtype::F8_E4M3: return at::kFloat8_e4m3fn;
    case Dtype::F8_E5M2: return at::kFloat8_e5m2;
#else  // LibTorch 1.13 has none of these
    case Dtype::U16:
    case Dtype::U32:
    case Dtype::U64:
    case Dtype::F8_E4M3:
    case Dtype::F8_E5M2: return std::nullopt;
#endif
  }
  return std::nullopt;
}

Dtype from_scalar_type(c10::ScalarType type) {
  for (Dtype d : kAllDtypes) {
    if (to_scalar_type(d) == type) return d;
  }
  throw Error(ErrorKind::UnsupportedDtype,
              std::string("LibTorch dtype ") + c10::toString(type) + " cannot be stored in a tensormap file");
}

at::Tensor tensor_view(const File& file, const TensorEntry& entry) {
  return view_as(file, entry, scalar_type_or_throw(file, entry), sizes_of(entry));
}

at::Tensor tensor_copy(const File& file, const TensorEntry& entry) {
  return tensor_view(file, entry).clone();
}

at::Tensor raw_bytes_view(const File& file, const TensorEntry& entry) {
  return view_as(file, entry, at::kByte, {static_cast<int64_t>(entry.byte_length)});
}

namespace detail {
namespace {

// The entry's bytes in a new U8 tensor, read with pread.
at::Tensor read_owned(const File& file, const TensorEntry& e) {
  at::Tensor out = at::empty({static_cast<int64_t>(e.byte_length)}, at::kByte);
  file.read(e, 0, out.data_ptr(), e.byte_length);
  return out;
}

// Bytes [offset, offset + numel * element size) of the entry as a tensor of `sizes`, in
// a mapping of their own (ViewMapping::Own); a copy where they are not aligned to the
// element size, as view_as() does.
at::Tensor region_view(const File& file, const TensorEntry& e, uint64_t offset, at::IntArrayRef sizes) {
  const c10::ScalarType type = scalar_type_or_throw(file, e);
  const auto options = at::TensorOptions().dtype(type).device(at::kCPU);
  const uint64_t bytes = static_cast<uint64_t>(c10::multiply_integers(sizes)) * c10::elementSize(type);
  if ((e.offset + offset) % c10::elementSize(type) != 0) {
    at::Tensor copy = at::empty(sizes, options);
    file.read(e, offset, copy.data_ptr(), bytes);
    return copy;
  }
  std::shared_ptr<void> region = file.map_region(e, offset, bytes);
  void* data = region.get();
  return at::from_blob(data, sizes, [region](void*) mutable { region.reset(); }, options);
}

// How a slice along `dim` lies in the file: `outer` runs (the product of the earlier
// dimensions) of `inner` bytes per element along `dim`. Sizes come from a validated
// entry, so none of these products overflows.
struct SliceLayout {
  std::vector<int64_t> sizes;
  uint64_t outer = 1, inner = 0;
};

SliceLayout layout_of(const TensorEntry& e, int64_t dim) {
  SliceLayout l{sizes_of(e)};
  for (int64_t d = 0; d < dim; ++d) l.outer *= static_cast<uint64_t>(l.sizes[static_cast<size_t>(d)]);
  l.inner = dtype_size(e.dtype);
  for (size_t d = static_cast<size_t>(dim) + 1; d < l.sizes.size(); ++d) l.inner *= static_cast<uint64_t>(l.sizes[d]);
  return l;
}

// Copies the bytes of elements [start, start + length) along `dim` into `dest` with
// pread: one read when they are one contiguous range, one per row otherwise.
void read_part(const File& file, const TensorEntry& e, int64_t dim, int64_t start, int64_t length, void* dest) {
  const SliceLayout l = layout_of(e, dim);
  const auto first = static_cast<uint64_t>(start) * l.inner, bytes = static_cast<uint64_t>(length) * l.inner;
  if (l.outer == 1 || length == 0) {
    file.read(e, first, dest, bytes);
    return;
  }
  const uint64_t row = static_cast<uint64_t>(l.sizes[static_cast<size_t>(dim)]) * l.inner;
  file.read_rows(e, first, row, bytes, l.outer, dest);
}

// Elements [start, start + length) along `dim`: a zero-copy view when the part is one
// contiguous range of the file (every dimension before `dim` is 1, so always for dim 0),
// in the whole file's mapping or one of its own; otherwise a new tensor filled row by
// row with pread (into memory faulted in ahead, in one system call), so that only the
// needed bytes are read and nothing else of the file enters this process.
at::Tensor slice_of(const File& file, const TensorEntry& e, int64_t dim, int64_t start, int64_t length,
                    ViewMapping mapping) {
  SliceLayout l = layout_of(e, dim);
  if (l.outer == 1 || length == 0) {
    if (mapping == ViewMapping::File) return tensor_view(file, e).narrow(dim, start, length);
    l.sizes[static_cast<size_t>(dim)] = length;
    return region_view(file, e, static_cast<uint64_t>(start) * l.inner, l.sizes);
  }
  l.sizes[static_cast<size_t>(dim)] = length;
  at::Tensor out = allocate_populated(l.sizes, at::TensorOptions().dtype(scalar_type_or_throw(file, e)));
  read_part(file, e, dim, start, length, out.data_ptr());
  return out;
}

StateDict::Info info_of(const TensorEntry& e) {
  return {e.dtype, sizes_of(e), e.byte_length};
}

// One tensormap or safetensors file.
struct FileSource : StateSource {
  explicit FileSource(File f) : file(std::move(f)) {
    names.reserve(file.tensors().size());
    for (const auto& e : file.tensors()) names.emplace_back(e.name);
    index_names();
  }
  std::string format() const override { return format_name(file.format()); }
  StateDict::Info info(size_t i) const override { return info_of(file.tensors()[i]); }
  at::Tensor tensor(size_t i) const override { return tensor_view(file, file.tensors()[i]); }
  // Read with pread, not through the mapping: see File::read.
  at::Tensor raw_bytes(size_t i) const override { return read_owned(file, file.tensors()[i]); }
  void read(size_t i, void* dest) const override {
    const TensorEntry& e = file.tensors()[i];
    file.read(e, 0, dest, e.byte_length);
  }
  void release(size_t i) const override { file.release_pages(file.tensors()[i]); }
  at::Tensor own_view(size_t i) const override {
    const TensorEntry& e = file.tensors()[i];
    return region_view(file, e, 0, sizes_of(e));
  }
  at::Tensor slice(size_t i, int64_t dim, int64_t start, int64_t length, ViewMapping mapping) const override {
    return slice_of(file, file.tensors()[i], dim, start, length, mapping);
  }
  void read_slice(size_t i, int64_t dim, int64_t start, int64_t length, void* dest) const override {
    read_part(file, file.tensors()[i], dim, start, length, dest);
  }
  std::vector<std::pair<std::string, std::string>> metadata() const override {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto& [k, v] : file.metadata()) out.emplace_back(k, v);
    return out;
  }
  File file;
};

// A sharded checkpoint: the index names every tensor; a shard is mapped the first time
// one of its tensors is asked for, and checked against the index then.
struct ShardedSource : StateSource {
  explicit ShardedSource(ShardIndex i) : index(std::move(i)), shards(index.shard_files().size()) {
    for (const auto& [name, shard] : index.weight_map()) names.push_back(name);
    index_names();
    once = std::vector<std::once_flag>(shards.size());
  }

  // The shard of tensor i and the tensor's entry in it.
  std::pair<const File*, const TensorEntry*> locate(size_t i) const {
    const uint32_t s = index.weight_map()[i].second;
    std::call_once(once[s], [&] { shards[s] = File::open(index.shard_path(s)); });
    const File& shard = *shards[s];
    const TensorEntry* entry = shard.find(names[i]);
    if (!entry) {
      throw Error(ErrorKind::ShardIndexInvalid,
                  index.path() + ": tensor '" + names[i] + "' is mapped to shard '" +
                      index.shard_files()[s] + "', which does not contain it");
    }
    return {&shard, entry};
  }

  std::string format() const override {
    if (index.shard_files().empty()) return "sharded";
    locate_any();
    return std::string("sharded ") + format_name(shards[0]->format());
  }
  void locate_any() const {
    std::call_once(once[0], [&] { shards[0] = File::open(index.shard_path(0)); });
  }
  StateDict::Info info(size_t i) const override { return info_of(*locate(i).second); }
  at::Tensor tensor(size_t i) const override {
    const auto [shard, entry] = locate(i);
    return tensor_view(*shard, *entry);
  }
  at::Tensor raw_bytes(size_t i) const override {
    const auto [shard, entry] = locate(i);
    return read_owned(*shard, *entry);
  }
  void read(size_t i, void* dest) const override {
    const auto [shard, entry] = locate(i);
    shard->read(*entry, 0, dest, entry->byte_length);
  }
  void release(size_t i) const override {
    const auto [shard, entry] = locate(i);
    shard->release_pages(*entry);
  }
  at::Tensor own_view(size_t i) const override {
    const auto [shard, entry] = locate(i);
    return region_view(*shard, *entry, 0, sizes_of(*entry));
  }
  at::Tensor slice(size_t i, int64_t dim, int64_t start, int64_t length, ViewMapping mapping) const override {
    const auto [shard, entry] = locate(i);
    return slice_of(*shard, *entry, dim, start, length, mapping);
  }
  void read_slice(size_t i, int64_t dim, int64_t start, int64_t length, void* dest) const override {
    const auto [shard, entry] = locate(i);
    read_part(*shard, *entry, dim, start, length, dest);
  }

  ShardIndex index;
  mutable std::vector<std::optional<File>> shards;
  mutable std::vector<std::once_flag> once;
};

bool starts_with_index_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  unsigned char head[64] = {};
  in.read(reinterpret_cast<char*>(head), sizeof head);
  return looks_like_shard_index(head, static_cast<uint64_t>(in.gcount()));
}

}  // namespace
}  // namespace detail

StateDict StateDict::open(const std::string& path) {
  if (detail::looks_like_zip(path)) return StateDict(detail::open_torch_save(path));
  // A safetensors file also holds JSON, after its 8-byte length: File::open recognises it.
  if (detail::starts_with_index_json(path)) {
    return StateDict(std::make_shared<detail::ShardedSource>(ShardIndex::open(path)));
  }
  return StateDict(File::open(path));
}

StateDict::StateDict(File file) : source_(std::make_shared<detail::FileSource>(std::move(file))) {}
StateDict::StateDict(std::shared_ptr<const detail::StateSource> source) : source_(std::move(source)) {}

std::string StateDict::format() const { return source_->format(); }
size_t StateDict::size() const { return source_->size(); }
bool StateDict::empty() const { return source_->size() == 0; }
bool StateDict::contains(std::string_view name) const { return source_->find(name).has_value(); }
std::vector<std::string> StateDict::keys() const { return source_->names; }
std::vector<std::pair<std::string, std::string>> StateDict::metadata() const { return source_->metadata(); }
std::vector<std::pair<std::string, std::string>> StateDict::skipped() const { return source_->skipped_values(); }

size_t StateDict::index_of(std::string_view name) const {
  if (const auto i = source_->find(name)) return *i;
  throw Error(ErrorKind::NotFound, "no tensor named '" + std::string(name) + "' in this " +
                                       source_->format() + " checkpoint (" +
                                       std::to_string(source_->size()) + " tensors)");
}

StateDict::Info StateDict::info(std::string_view name) const { return source_->info(index_of(name)); }
at::Tensor StateDict::at(std::string_view name, ViewMapping mapping) const {
  const size_t i = index_of(name);
  return mapping == ViewMapping::Own ? source_->own_view(i) : source_->tensor(i);
}
at::Tensor StateDict::raw_bytes(std::string_view name) const { return source_->raw_bytes(index_of(name)); }
void StateDict::read(std::string_view name, void* dest) const { source_->read(index_of(name), dest); }
void StateDict::release(std::string_view name) const { source_->release(index_of(name)); }

at::Tensor StateDict::slice(std::string_view name, int64_t dim, int64_t start, int64_t length,
                            ViewMapping mapping) const {
  const size_t i = checked_slice(name, dim, start, length);
  return source_->slice(i, dim, start, length, mapping);
}

void StateDict::read(std::string_view name, int64_t dim, int64_t start, int64_t length, void* dest) const {
  const size_t i = checked_slice(name, dim, start, length);
  source_->read_slice(i, dim, start, length, dest);
}

size_t StateDict::checked_slice(std::string_view name, int64_t& dim, int64_t start, int64_t length) const {
  const size_t i = index_of(name);
  const Info info = source_->info(i);
  const auto rank = static_cast<int64_t>(info.shape.size());
  auto refuse = [&](const std::string& why) {
    return Error(ErrorKind::InvalidArgument, "cannot slice tensor '" + std::string(name) + "' of this " +
                                                 source_->format() + " checkpoint: " + why);
  };
  if (dim < -rank || dim >= rank || rank == 0) {
    throw refuse("dimension " + std::to_string(dim) + " is out of range for rank " + std::to_string(rank));
  }
  if (dim < 0) dim += rank;
  const int64_t size = info.shape[static_cast<size_t>(dim)];
  if (start < 0 || length < 0 || start > size || length > size - start) {
    throw refuse("elements [" + std::to_string(start) + ", " + std::to_string(start) + " + " +
                 std::to_string(length) + ") are not within dimension " + std::to_string(dim) +
                 " of size " + std::to_string(size));
  }
  return i;
}

torch::OrderedDict<std::string, at::Tensor> StateDict::to_ordered_dict() const {
  torch::OrderedDict<std::string, at::Tensor> out;
  out.reserve(size());
  for (size_t i = 0; i < size(); ++i) out.insert(source_->names[i], source_->tensor(i));
  return out;
}

StateDict::Iterator StateDict::begin() const { return Iterator(this, 0); }
StateDict::Iterator StateDict::end() const { return Iterator(this, size()); }

StateDict::Iterator::value_type StateDict::Iterator::operator*() const {
  return {dict_->source_->names[index_], dict_->source_->tensor(index_)};
}

}  // namespace tensormap
