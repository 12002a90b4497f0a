// Binding torch::nn modules to tensormap files: skeletons, release, load and save.
//
// The linear-memory recipe:
//
//   auto net = tensormap::build_skeleton([] { return MyNet(config); });  // no weight memory
//   tensormap::load(*net, "model.tmap");  // map mode: parameters point into the file
//
// Thread-safety: none of these functions may run concurrently on the same module. The
// skeleton scope is thread-local: it affects only the thread that opened it.
//
// Implementation note: the skeleton scope and released tensors use LibTorch's
// PrivateUse1 dispatch key. A program that registers its own PrivateUse1 backend cannot
// use these two features (load and save work regardless).
#pragma once

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <string>
#include <utility>
#include <vector>

#include "tensormap/file.h"
#include "tensormap/format.h"
#include "tensormap/tensor.h"

namespace tensormap {

// While a SkeletonScope lives on this thread, LibTorch's random initialisers
// (uniform_, normal_, and so those of torch::nn::init built on them) do nothing, so a
// model is constructed without writing its weights: fresh allocations are never
// touched and cost no resident memory. The weights hold garbage until loaded; prefer
// build_skeleton, which also releases them so that any use before loading throws.
// Other initialisers (fill_, zero_) still run; they cover only small tensors in
// torch::nn (biases of norms, running statistics).
class SkeletonScope {
 public:
  SkeletonScope();
  ~SkeletonScope();
  SkeletonScope(const SkeletonScope&) = delete;
  SkeletonScope& operator=(const SkeletonScope&) = delete;

 private:
  // The whole thread-local key state, restored exactly on exit. (LibTorch 1.13's
  // IncludeDispatchKeyGuard leaves the PrivateUse1 backend bit behind when it ends,
  // which would keep skipping initialisers after the scope.)
  c10::impl::LocalDispatchKeySet saved_;
};

// Frees the storage of every parameter and buffer of `module` (recursively). Each tensor
// keeps its TensorImpl (so module members and parameter dicts stay one object), shape,
// dtype, device, requires_grad and leaf status. Until the module is loaded, any operation
// on a released tensor throws c10::Error naming the operator; it never computes on garbage.
void release(torch::nn::Module& module);

// True if `tensor` was released and not loaded since.
bool is_released(const at::Tensor& tensor);

// Constructs a model with `make()` inside a SkeletonScope, then releases it. `make`
// returns a module holder (torch::nn::Linear, TORCH_MODULE types) or a shared_ptr.
template <typename Factory>
auto build_skeleton(Factory&& make) {
  auto model = [&] {
    SkeletonScope scope;
    return make();
  }();
  release(*model);
  return model;
}

enum class LoadMode {
  // Zero-copy: each tensor's storage is the file's private mapping. Pages are read when
  // touched; a write (an optimizer step) copies only the pages it touches and never
  // reaches the file. Dtypes must match exactly.
  Map,
  // Owned memory, tensor by tensor; the mapped pages of each tensor are given back after
  // its copy. Converts dtypes (BF16 in the file into an F32 model, say). Into a module
  // that still has storage, copies in place.
  Copy,
};

// Tensor parallelism: how a model is split among `world_size` ranks. A parameter whose
// name matches a pattern of `splits` is split along that dimension into world_size equal
// parts, and rank `rank` keeps part `rank`; other parameters are replicated (loaded
// whole). In patterns, '*' matches any run of characters (dots included); the first
// matching pattern wins. The model given to load() is the rank's own model, built with
// the split shapes (as Megatron-style layers are): a planned tensor of shape [8192, 4096]
// split along dim 0 among 4 ranks loads into a [2048, 4096] parameter.
struct ParallelPlan {
  int64_t rank = 0;
  int64_t world_size = 1;
  std::vector<std::pair<std::string, int64_t>> splits;

  // The split dimension of the named tensor, or nothing if it is replicated.
  std::optional<int64_t> split_dim(std::string_view name) const;
};

// True if `name` matches `pattern`, where '*' matches any run of characters.
bool matches_pattern(std::string_view pattern, std::string_view name);

struct LoadOptions {
  LoadMode mode = LoadMode::Map;
  // Strict: any missing key, unexpected key or shape or dtype mismatch throws
  // Error(ModelMismatch) listing all of them, and nothing is loaded. Not strict: the
  // matching tensors are loaded and the rest reported.
  bool strict = true;
  // Load only this rank's part of each split tensor (see ParallelPlan). Parts along dim 0
  // are zero-copy in map mode; other parts are read row by row (StateDict::slice), so a
  // rank reads and keeps only its share and the rest of the file stays out of memory. In
  // map mode every bound tensor is read ahead exactly (MADV_WILLNEED), because page-fault
  // read-around (read_ahead_kb) would otherwise pull in other ranks' parts; and it is
  // mapped on its own (ViewMapping::Own), because a fault in the whole file's mapping maps
  // the whole page-cache folio around it, other ranks' bytes included. (Past a quarter of
  // vm.max_map_count tensors, the whole file's mapping is used.) In copy mode each part
  // is read with pread straight into its parameter, with no temporary.
  std::optional<ParallelPlan> parallel;
};

struct LoadReport {
  std::vector<std::string> loaded;      // names bound or copied
  std::vector<std::string> missing;     // in the model, not in the file
  std::vector<std::string> unexpected;  // in the file, not in the model
  std::vector<std::string> mismatched;  // one line each: name, what differs
  bool complete() const { return missing.empty() && unexpected.empty() && mismatched.empty(); }
  std::string summary() const;          // one line listing every problem
};

// Binds every parameter and buffer of `module` by its dotted name (as named_parameters
// and named_buffers spell it) to the tensor of that name in the file. The file is a
// tensormap or a safetensors file, recognised by its content.
// `path` may be any checkpoint StateDict::open reads: tensormap, safetensors, a sharded
// index, or a torch.save archive.
LoadReport load(torch::nn::Module& module, const StateDict& state, const LoadOptions& options = {});
LoadReport load(torch::nn::Module& module, const File& file, const LoadOptions& options = {});
LoadReport load(torch::nn::Module& module, const std::string& path,
                const LoadOptions& options = {});

// Faults in now every page of every parameter and buffer of `module` (after a map-mode
// load: the file's pages), with MADV_POPULATE_READ, split among `threads` threads (0:
// LibTorch's intra-op thread count). A full touch at once instead of one 4 KiB fault at a
// time on first use. Where the kernel lacks MADV_POPULATE_READ (before 5.14), reads one
// byte per page instead. Does not write: map-mode pages stay shared with the page cache.
void prefault(const torch::nn::Module& module, int threads = 0);

struct SaveOptions {
  uint64_t alignment = 4096;  // tensormap files only
  std::vector<std::pair<std::string, std::string>> metadata;
  bool sync = true;
  Format format = Format::Tensormap;  // or Format::Safetensors, Format::TorchSave
};

// The state of a module: every parameter (recursively, in module order), then every
// buffer, named as named_parameters and named_buffers name them. Undefined tensors are
// left out. This is what save(module) writes and load(module) binds.
std::vector<std::pair<std::string, at::Tensor>> named_state(const torch::nn::Module& module);

// Streams the tensors into a new file, one at a time: a non-contiguous tensor is made
// contiguous (one tensor's worth of extra memory at most), others are written straight
// from their storage. Atomic as Writer is: saving over the very file a model was loaded
// from in map mode is safe and leaves the loaded model unchanged.
// Tied weights: every name is stored with its own bytes. A tie by identity (one tensor
// registered under two names) survives a load, because both names bind the same tensor;
// distinct tensors that merely share storage come back as separate, equal tensors.
void save(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
          const std::string& path, const SaveOptions& options = {});
void save(const torch::nn::Module& module, const std::string& path,
          const SaveOptions& options = {});

}  // namespace tensormap
