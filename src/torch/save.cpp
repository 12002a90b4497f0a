// Saving a torch::nn::Module, or named tensors, through the core's writers.
#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <map>
#include <memory>
#include <tuple>

#include "released.h"
#include "saving.h"
#include "tensormap/edit.h"
#include "tensormap/error.h"
#include "tensormap/save.h"
#include "tensormap/skeleton.h"
#include "tensormap/tensor.h"
#include "tensormap/writer.h"

namespace tensormap {

std::vector<std::pair<std::string, at::Tensor>> named_state(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    if (item.value().defined()) out.emplace_back(item.key(), item.value());
  }
  for (const auto& item : module.named_buffers(/*recurse=*/true)) {
    if (item.value().defined()) out.emplace_back(item.key(), item.value());
  }
  return out;
}

namespace {

// The most a piece of a tensor copied to be written takes.
constexpr int64_t kPieceBytes = 16 << 20;

// Writes `t`'s elements in logical order. A contiguous CPU tensor is written from its own
// memory; any other is cut along its first dimensions into pieces of at most kPieceBytes,
// each copied into `staging` (one buffer of kPieceBytes, made at the first need and reused:
// fresh allocations of that size would each grow the heap) and written in turn, so that
// saving a strided view or a GPU tensor holds one piece at a time, not a copy of the tensor.
void write_in_pieces(TensorWriter& writer, const at::Tensor& t, at::Tensor& staging) {
  const auto nbytes = static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size());
  if (nbytes == 0) return;
  if (t.device().is_cpu() && t.is_contiguous()) {
    writer.write(t.data_ptr(), static_cast<size_t>(nbytes));
    return;
  }
  if (nbytes <= kPieceBytes || t.dim() == 0) {
    if (!staging.defined()) staging = at::empty({kPieceBytes}, at::kByte);
    at::from_blob(staging.data_ptr(), t.sizes(), t.options().device(at::kCPU)).copy_(t);
    writer.write(staging.data_ptr(), static_cast<size_t>(nbytes));
    return;
  }
  const int64_t rows = t.size(0), row_bytes = nbytes / rows;
  if (row_bytes > kPieceBytes) {  // one row is too large: cut each row in turn
    for (int64_t r = 0; r < rows; ++r) write_in_pieces(writer, t.select(0, r), staging);
    return;
  }
  const int64_t per_piece = kPieceBytes / row_bytes;  // >= 1 rows, each a piece no larger
  for (int64_t r = 0; r < rows; r += per_piece) {
    write_in_pieces(writer, t.narrow(0, r, std::min(per_piece, rows - r)), staging);
  }
}

// What makes two tensors one tied weight: the same elements of the same storage, read
// the same way.
using TieKey = std::tuple<const void*, int64_t, std::vector<int64_t>, std::vector<int64_t>, int, int, bool, bool>;
TieKey tie_key(const at::Tensor& t) {
  return {t.storage().unsafeGetStorageImpl(),
          t.storage_offset(),
          t.sizes().vec(),
          t.strides().vec(),
          static_cast<int>(t.scalar_type()),
          static_cast<int>(t.device().type()) * 1000 + t.device().index(),
          t.is_conj(),
          t.is_neg()};
}

}  // namespace

void detail::save_observed(const std::vector<std::pair<std::string, at::Tensor>>& tensors, const std::string& path,
                           const SaveOptions& options, SaveObserver* observer) {
  WriterOptions writer_options;
  writer_options.alignment = options.alignment;
  writer_options.metadata = options.metadata;
  writer_options.sync = options.sync;
  writer_options.format = options.format;
  const bool ties = options.store_ties_once && supports_aliases(writer_options);
  std::map<TieKey, std::string> first_of;  // each stored tensor's first name
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) {
      throw Error(ErrorKind::InvalidArgument, path + ": tensor " + quoted_name(name) + " is undefined");
    }
    if (is_released(t)) {
      throw Error(ErrorKind::InvalidArgument,
                  path + ": tensor " + quoted_name(name) + " was released and holds no data to save");
    }
    if (t.is_meta()) {
      throw Error(ErrorKind::InvalidArgument,
                  path + ": tensor " + quoted_name(name) + " is on the meta device and holds no data to save");
    }
    std::vector<uint64_t> shape(t.sizes().begin(), t.sizes().end());
    Dtype dtype;
    try {
      dtype = from_scalar_type(t.scalar_type());
    } catch (const Error& e) {
      throw Error(ErrorKind::UnsupportedDtype, path + ": tensor " + quoted_name(name) + ": " + e.what());
    }
    specs.push_back({name, dtype, std::move(shape)});
    if (ties && t.numel() > 0) {
      const auto [first, inserted] = first_of.emplace(tie_key(t), name);
      if (!inserted) specs.back().alias_of = first->second;
    }
  }
  const std::unique_ptr<TensorWriter> writer = open_writer(path, specs, writer_options);
  if (observer) {
    std::vector<bool> read(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) read[i] = !specs[i].alias_of && tensors[i].second.numel() > 0;
    observer->planned(read);
  }
  at::Tensor staging;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (specs[i].alias_of) continue;  // its bytes are its first name's
    at::Tensor t = tensors[i].second.detach();
    if (t.is_conj()) t = t.resolve_conj();
    if (t.is_neg()) t = t.resolve_neg();
    write_in_pieces(*writer, t, staging);
    if (observer) observer->written(i);
  }
  writer->commit();
}

void save(const std::vector<std::pair<std::string, at::Tensor>>& tensors, const std::string& path,
          const SaveOptions& options) {
  detail::save_observed(tensors, path, options, nullptr);
}

void put(Editor& editor, std::string name, const at::Tensor& tensor) {
  if (!tensor.defined() || is_released(tensor)) {
    throw Error(ErrorKind::InvalidArgument, "tensor " + quoted_name(name) +
                                                " is undefined or released: "
                                                "it holds no data to put into a file");
  }
  Dtype dtype;
  try {
    dtype = from_scalar_type(tensor.scalar_type());
  } catch (const Error& e) {
    throw Error(ErrorKind::UnsupportedDtype, "tensor " + quoted_name(name) + ": " + e.what());
  }
  at::Tensor t = tensor.detach();
  if (t.is_conj()) t = t.resolve_conj();
  if (t.is_neg()) t = t.resolve_neg();
  if (!t.device().is_cpu() || !t.is_contiguous()) t = t.to(at::kCPU).contiguous();
  std::vector<uint64_t> shape(t.sizes().begin(), t.sizes().end());
  auto owner = std::make_shared<const at::Tensor>(t);
  const void* data = owner->numel() > 0 ? owner->data_ptr() : nullptr;
  editor.put({std::move(name), dtype, std::move(shape)}, data, std::move(owner));
}

void save(const torch::nn::Module& module, const std::string& path, const SaveOptions& options) {
  save(named_state(module), path, options);
}

}  // namespace tensormap
