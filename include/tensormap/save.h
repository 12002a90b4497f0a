// Saving a torch::nn module, or named tensors, in any format tensormap writes, one tensor
// at a time.
//
// Thread-safety: the module must not change while it is saved.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tensormap/export.h"
#include "tensormap/format.h"

namespace tensormap {

struct SaveOptions {
  uint64_t alignment = 4096;  // tensormap files only
  std::vector<std::pair<std::string, std::string>> metadata;
  bool sync = true;
  Format format = Format::Tensormap;  // or Format::Safetensors, Format::TorchSave
  // Tied weights (names whose tensors are the very same view of one storage: same
  // storage, offset, shape, strides and dtype) stored once, the other names aliases of
  // the first (supports_aliases() formats: a tensormap file, which is then format 2.0 and
  // refused by readers of 1.x only; a torch.save archive). False stores every name's bytes.
  bool store_ties_once = true;
};

// The state of a module: every parameter (recursively, in module order), then every
// buffer, named as named_parameters and named_buffers name them. Undefined tensors are
// left out. This is what save(module) writes and load(module) binds.
TENSORMAP_EXPORT std::vector<std::pair<std::string, at::Tensor>> named_state(const torch::nn::Module& module);

// Streams the tensors into a new file, one at a time: a contiguous CPU tensor is written
// straight from its storage, any other (a strided view, a GPU tensor) is copied in pieces
// of at most 16 MiB through one reused buffer, whatever its size (open_writer picks the
// writer for options.format). Atomic as every
// writer is: saving over the very file a model was loaded
// from in map mode is safe and leaves the loaded model unchanged.
// Tied weights are stored once (SaveOptions::store_ties_once), and a load ties them
// again: the names bind one tensor (load.h). Tensors that merely overlap in a storage
// (different views) are stored each with its own bytes.
TENSORMAP_EXPORT void save(const std::vector<std::pair<std::string, at::Tensor>>& tensors, const std::string& path,
                           const SaveOptions& options = {});
TENSORMAP_EXPORT void save(const torch::nn::Module& module, const std::string& path, const SaveOptions& options = {});

class Editor;  // edit.h

// Adds `tensor` to the edit under `name`, or replaces the tensor of that name: the
// LibTorch form of Editor::put, for `sd[name] = tensor` on a file (edit.h). The Editor
// keeps the tensor alive until it is destroyed; a tensor that is not a contiguous CPU
// tensor is first copied into one (its whole size). Throws Error(InvalidArgument) for
// an undefined or released tensor, Error(UnsupportedDtype).
TENSORMAP_EXPORT void put(Editor& editor, std::string name, const at::Tensor& tensor);

}  // namespace tensormap
