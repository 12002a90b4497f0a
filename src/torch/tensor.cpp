// Tensors over a File's mapping, and the lazy StateDict.
#include "tensormap/tensor.h"

#include <ATen/ATen.h>

#include <cstring>

#include "tensormap/error.h"

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
                  ", which LibTorch 1.13 cannot represent; read it with raw_bytes_view");
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
    case Dtype::U16:
    case Dtype::U32:
    case Dtype::U64:
    case Dtype::F8_E4M3:
    case Dtype::F8_E5M2: return std::nullopt;
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

StateDict StateDict::open(const std::string& path) { return StateDict(File::open(path)); }

StateDict::StateDict(File file) : file_(std::move(file)) {}

size_t StateDict::size() const { return file_.tensors().size(); }
bool StateDict::empty() const { return file_.tensors().empty(); }
bool StateDict::contains(std::string_view name) const { return file_.find(name) != nullptr; }

std::vector<std::string> StateDict::keys() const {
  std::vector<std::string> out;
  out.reserve(size());
  for (const auto& e : file_.tensors()) out.emplace_back(e.name);
  return out;
}

at::Tensor StateDict::at(std::string_view name) const { return tensor_view(file_, file_.at(name)); }

torch::OrderedDict<std::string, at::Tensor> StateDict::to_ordered_dict() const {
  torch::OrderedDict<std::string, at::Tensor> out;
  out.reserve(size());
  for (const auto& e : file_.tensors()) out.insert(std::string(e.name), tensor_view(file_, e));
  return out;
}

StateDict::Iterator StateDict::begin() const { return Iterator(&file_, 0); }
StateDict::Iterator StateDict::end() const { return Iterator(&file_, size()); }

StateDict::Iterator::value_type StateDict::Iterator::operator*() const {
  const TensorEntry& e = file_->tensors()[index_];
  return {e.name, tensor_view(*file_, e)};
}

}  // namespace tensormap
