// Tensors over a File's mapping, and the dtype mapping between tensormap and LibTorch.
#include "tensormap/tensor.h"

#include <ATen/ATen.h>
#include <torch/version.h>

#include <cstring>

#include "tensor_views.h"
#include "tensormap/error.h"

namespace tensormap {
namespace {

// A view of the entry's bytes; a copy where they are not aligned to the element size
// (possible in safetensors files), so that no misaligned typed pointer is ever made.
at::Tensor view_as(const File& file, const TensorEntry& entry, c10::ScalarType type, at::IntArrayRef sizes) {
  const auto options = at::TensorOptions().dtype(type).device(at::kCPU);
  void* data = file.cow_data(entry);
  if (reinterpret_cast<uintptr_t>(data) % c10::elementSize(type) != 0) {
    at::Tensor copy = at::empty(sizes, options);
    std::memcpy(copy.data_ptr(), data, entry.byte_length);
    return copy;
  }
  auto owner = file.keep_alive();
  return at::from_blob(
      data, sizes, [owner](void*) mutable { owner.reset(); }, options);
}

}  // namespace

namespace detail {

std::vector<int64_t> sizes_of(const TensorEntry& entry) {
  // Validation guarantees every dimension is below 2^63.
  return std::vector<int64_t>(entry.dims.begin(), entry.dims.begin() + entry.rank);
}

c10::ScalarType scalar_type_or_throw(Dtype dtype, const std::string& path, std::string_view name) {
  if (auto type = to_scalar_type(dtype)) return *type;
  throw Error(ErrorKind::UnsupportedDtype,
              path + ": tensor " + quoted_name(name) + " has dtype " + std::string(dtype_name(dtype)) +
                  ", which LibTorch " TORCH_VERSION " cannot represent; read its raw bytes instead");
}

}  // namespace detail

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
  return view_as(file, entry, detail::scalar_type_or_throw(entry.dtype, file.path(), entry.name),
                 detail::sizes_of(entry));
}

at::Tensor tensor_copy(const File& file, const TensorEntry& entry) { return tensor_view(file, entry).clone(); }

at::Tensor raw_bytes_view(const File& file, const TensorEntry& entry) {
  return view_as(file, entry, at::kByte, {static_cast<int64_t>(entry.byte_length)});
}

}  // namespace tensormap
