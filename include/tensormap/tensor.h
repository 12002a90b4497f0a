// Tensors of a tensormap or safetensors File: zero-copy views and owned copies, and the
// mapping between tensormap's dtypes and LibTorch's. (A checkpoint of any format, as a
// dict of tensors: state_dict.h.)
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

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tensormap/dtype.h"
#include "tensormap/export.h"
#include "tensormap/file.h"

namespace tensormap {

// The LibTorch dtype of a tensormap dtype, or nothing where this LibTorch has none
// (1.13: U16, U32, U64, F8).
TENSORMAP_EXPORT std::optional<c10::ScalarType> to_scalar_type(Dtype dtype);

// The tensormap dtype of a LibTorch dtype. Throws Error(UnsupportedDtype) for dtypes the
// format does not store (quantized types, for example).
TENSORMAP_EXPORT Dtype from_scalar_type(c10::ScalarType type);

// A zero-copy view of the entry with its dtype and shape. Where the bytes are not aligned
// to the element size (some safetensors files), an owned, aligned copy instead.
TENSORMAP_EXPORT at::Tensor tensor_view(const File& file, const TensorEntry& entry);

// An owned, contiguous copy of the entry.
TENSORMAP_EXPORT at::Tensor tensor_copy(const File& file, const TensorEntry& entry);

// A zero-copy U8 view of the entry's bytes, shape [byte_length], for any dtype.
TENSORMAP_EXPORT at::Tensor raw_bytes_view(const File& file, const TensorEntry& entry);

}  // namespace tensormap
