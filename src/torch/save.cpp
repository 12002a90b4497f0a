// Saving a torch::nn::Module, or named tensors, through the core's writers.
#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <memory>

#include "released.h"
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

void save(const std::vector<std::pair<std::string, at::Tensor>>& tensors, const std::string& path,
          const SaveOptions& options) {
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
    std::vector<uint64_t> shape(t.sizes().begin(), t.sizes().end());
    Dtype dtype;
    try {
      dtype = from_scalar_type(t.scalar_type());
    } catch (const Error& e) {
      throw Error(ErrorKind::UnsupportedDtype, path + ": tensor " + quoted_name(name) + ": " + e.what());
    }
    specs.push_back({name, dtype, std::move(shape)});
  }
  WriterOptions writer_options;
  writer_options.alignment = options.alignment;
  writer_options.metadata = options.metadata;
  writer_options.sync = options.sync;
  writer_options.format = options.format;
  const std::unique_ptr<TensorWriter> writer = open_writer(path, std::move(specs), writer_options);
  for (const auto& item : tensors) {
    // One tensor at a time: at most one contiguous copy exists at once.
    at::Tensor t = item.second.detach();
    if (!t.device().is_cpu()) t = t.cpu();
    if (t.is_conj()) t = t.resolve_conj();
    if (t.is_neg()) t = t.resolve_neg();
    if (!t.is_contiguous()) t = t.contiguous();
    const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
    if (nbytes > 0) writer->write_tensor(t.data_ptr(), nbytes);
  }
  writer->commit();
}

void save(const torch::nn::Module& module, const std::string& path, const SaveOptions& options) {
  save(named_state(module), path, options);
}

}  // namespace tensormap
