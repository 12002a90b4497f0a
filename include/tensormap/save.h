// Saving a torch::nn module, or named tensors, in any format tensormap writes, one tensor
// at a time.
//
// Thread-safety: the module must not change while it is saved.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
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

// A save running in the background (save_async). wait() blocks until it is published
// or has failed, and rethrows its Error; done() says whether it has ended, without
// blocking. The destructor waits too (its error, not asked for, is dropped).
class TENSORMAP_EXPORT SaveHandle {
 public:
  struct State;            // shared with the saves that follow to the same path
  SaveHandle() = default;  // a save already done
  explicit SaveHandle(std::shared_ptr<State> state);
  SaveHandle(SaveHandle&&) noexcept;
  SaveHandle& operator=(SaveHandle&&) noexcept;
  SaveHandle(const SaveHandle&) = delete;
  SaveHandle& operator=(const SaveHandle&) = delete;
  ~SaveHandle();

  void wait();
  bool done() const;
  // The process that writes the file, or -1 once wait() has returned.
  int pid() const;

 private:
  void finish_quietly() noexcept;
  std::shared_ptr<State> state_;
};

// save(), in the background: returns once a snapshot of the tensors is taken, while a
// child process (forked now) writes them. The file holds the values of the moment of the
// call, whatever the caller writes into the tensors afterwards.
//
// Cost: the call blocks for the fork (its page tables: some 10-30 ms per GiB of state),
// plus a copy of any tensor that is not a contiguous CPU tensor. Memory: a page the
// caller writes while the save runs is copied by the kernel, that page alone, unless the
// child has already written it (it gives back each tensor's pages once written); nothing
// else. Semantics: as save()'s, atomic; one background save per path at a time, a second
// call for the same path first waits for the one before. The child ignores SIGINT and
// outlives the caller: a process that exits with a save in flight leaves it to finish.
// Killed (SIGKILL), it leaves the old file and no temporary on a local filesystem.
// Where it does not apply: tensors on an accelerator (copied to the CPU first, in the
// call), and systems that forbid fork (strict overcommit may refuse to fork a large
// process: Error(Io) at the call).
TENSORMAP_EXPORT SaveHandle save_async(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                       const std::string& path, const SaveOptions& options = {});
TENSORMAP_EXPORT SaveHandle save_async(const torch::nn::Module& module, const std::string& path,
                                       const SaveOptions& options = {});

class Editor;  // edit.h

// Adds `tensor` to the edit under `name`, or replaces the tensor of that name: the
// LibTorch form of Editor::put, for `sd[name] = tensor` on a file (edit.h). The Editor
// keeps the tensor alive until it is destroyed; a tensor that is not a contiguous CPU
// tensor is first copied into one (its whole size). Throws Error(InvalidArgument) for
// an undefined or released tensor, Error(UnsupportedDtype).
TENSORMAP_EXPORT void put(Editor& editor, std::string name, const at::Tensor& tensor);

}  // namespace tensormap
