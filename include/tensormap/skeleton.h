// Skeletons: models built without weight memory, whose storage is released until a load
// binds it.
//
// The linear-memory recipe:
//
//   auto net = tensormap::build_skeleton([&] { return MyNet(config); });  // no weight memory
//   tensormap::load(*net, "model.tmap");  // map mode: parameters point into the file
//
// Thread-safety: none of these functions may run concurrently on the same module. The
// skeleton scope is thread-local: it affects only the thread that opened it.
//
// Implementation note: the skeleton scope and released tensors use LibTorch's
// PrivateUse1 dispatch key. A program that registers its own PrivateUse1 backend cannot
// use these two features (load and save work regardless).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/nn/module.h>

#include <functional>
#include <string>
#include <vector>

#include "tensormap/export.h"

namespace tensormap {

// While a SkeletonScope lives on this thread, a model is constructed without weight memory,
// whatever its initialisation does to its parameters:
// - A write into a parameter (a CPU leaf that requires grad) releases it and does
//   nothing else: random fills, fill_, zero_, arithmetic (erfinv_, mul_, add_, clamp_:
//   trunc_normal_), copy_, index_put_, any in-place or out= operator, also through a view.
//   The tensor keeps its TensorImpl, shape, dtype and requires_grad; a write into a tensor
//   already released does nothing.
// - An out-of-place operator that reads a released tensor (a buffer computed from a
//   weight, a view of it) returns released tensors, shaped by LibTorch's meta kernels; an
//   operator with no meta kernel, or one that needs the values (item()), throws c10::Error
//   naming it. Writing such values into part of a real tensor throws too.
// - uniform_ and normal_ of any tensor do nothing (nothing is drawn from the generator).
// - Everything else runs: buffers and tables computed from scratch keep their values.
// Tensors never written stay unreleased but untouched (fresh allocations cost no resident
// memory); prefer build_skeleton, which releases every parameter and buffer at the end so
// that any use before loading throws. Python's tensormap.skeleton() is this scope, and
// also releases each parameter as it is registered (which covers writes through .data).
class TENSORMAP_EXPORT SkeletonScope {
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
// The exceptions cost nothing and keep the tensor released: Tensor::to, and so
// Module::to, give a released tensor of the dtype asked (CPU only). As PyTorch's
// nn.Module.to does, and unlike LibTorch's C++ Module::to on a model with data, a
// floating-point dtype changes floating-point and complex tensors only: bool and integer
// buffers keep their dtype, as checkpoints hold them. So a skeleton built in F32 takes a
// BF16 checkpoint's dtype with `model->to(torch::kBFloat16)` before a map-mode load.
// A tensor that a non-strict load left released (the checkpoint lacked it) says so in
// its error; materialize gives it memory.
// Two operations give a released tensor data, since neither reads what it lacks:
// `t.set_(other)` (under a NoGradGuard) binds it to another tensor's storage, as a load
// does; outside a SkeletonScope, `t.copy_(src)` gives it memory of its own and fills it
// (so torch::load or Python's load_state_dict into a skeleton work, at the usual 2x).
// Tensor::set_data refuses a released tensor (LibTorch compares their dispatch keys).
TENSORMAP_EXPORT void release(torch::nn::Module& module);

// Releases one CPU tensor in place, as release(module) releases each of a module's (a
// tensor already released is left as it is). For code that holds a model's tensors
// rather than a torch::nn::Module: the Python package releases nn.Module tensors with it.
TENSORMAP_EXPORT void release(const at::Tensor& tensor);

// Makes a CPU `tensor` a released, contiguous tensor of shape `sizes`, in place: its
// TensorImpl, dtype and requires_grad stay, its storage goes, nothing is allocated. A
// skeleton's tensor made from a description alone (the Python package turns the meta
// tensors of a model built on the meta device into these before a load binds them).
// Throws Error(InvalidArgument) for a tensor not on the CPU or a negative size.
TENSORMAP_EXPORT void release(const at::Tensor& tensor, at::IntArrayRef sizes);

// True if `tensor` was released and not loaded since.
TENSORMAP_EXPORT bool is_released(const at::Tensor& tensor);

// Called by materialize for each tensor it gives memory to, with its dotted name.
using TensorInitializer = std::function<void(const std::string& name, at::Tensor& tensor)>;

// Runs one module's own initialisation (its `reset_parameters()`) over all of its
// tensors, for materialize, with gradient recording off; `name` is its dotted path ("" for
// the root). A module it has no rule for it leaves alone, and so with zeros.
using ModuleInitializer = std::function<void(const std::string& name, torch::nn::Module& module)>;

// Gives every parameter and buffer of `module` (recursively) that is still released its
// own memory, in place (the same tensor objects, so references and tied parameters stay
// valid), and returns their dotted names. This is for the tensors a non-strict load did
// not find in the checkpoint (LoadReport::missing). Each is initialised as torch::nn
// initialises it: the owning module's own reset_parameters() rules for the torch::nn
// modules (Linear, Bilinear, Conv*, ConvTranspose*, Embedding, EmbeddingBag, LayerNorm,
// GroupNorm, BatchNorm*, InstanceNorm*, RNN, LSTM, GRU, MultiheadAttention), or by
// `reset` where given, which then decides for every module; zeros for a module with no
// rule, whose initialisation lives in its constructor. A rule may write any tensor of its
// module and of the modules below it (MultiheadAttention's writes its out_proj's bias):
// every loaded tensor there sits out on a scratch tensor while the rule runs and comes back
// untouched (a scratch costs memory only where the rule writes it). Then `init`, if given,
// is called for each released tensor, and may overwrite it. Initialisers run even inside a
// SkeletonScope.
TENSORMAP_EXPORT std::vector<std::string> materialize(torch::nn::Module& module, const TensorInitializer& init = {},
                                                      const ModuleInitializer& reset = {});

namespace detail {
// Rethrows the exception being handled; where it is LibTorch's allocator refusing memory
// under strict overcommit accounting, as Error(Io) saying why and what to do.
[[noreturn]] TENSORMAP_EXPORT void rethrow_skeleton_failure();
}  // namespace detail

// Constructs a model with `make()` inside a SkeletonScope, then releases it. `make`
// returns a module holder (torch::nn::Linear, TORCH_MODULE types) or a shared_ptr.
// The constructor's allocations are never touched, so they cost no memory under the
// kernel's default overcommit; under strict accounting (vm.overcommit_memory = 2) they are
// charged until released, and a model larger than the commit limit fails with Error(Io).
template <typename Factory>
auto build_skeleton(Factory&& make) {
  auto model = [&] {
    SkeletonScope scope;
    try {
      return make();
    } catch (const c10::Error&) {
      detail::rethrow_skeleton_failure();
    }
  }();
  release(*model);
  return model;
}

}  // namespace tensormap
