// Skeletons and released tensors, both built on the PrivateUse1 dispatch key.
//
// Skeleton: a thread-local "include PrivateUse1" guard routes every operator through
// PrivateUse1 first. uniform_ and normal_ have kernels there that return self untouched,
// so torch::nn's random initialisation writes nothing; every other operator reaches a
// boxed fallback that re-dispatches to the real (CPU) kernel.
//
// Released: a released tensor has no data (a null storage of the right size) and its
// backend dispatch bit is switched from CPU to PrivateUse1. Every operator on it thus
// reaches PrivateUse1 too, where the same kernels see a released argument and throw.
// Composite operators (clone, copy_, views...) have kernels for every backend that
// would bypass a fallback; they are registered explicitly below so they check too.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <sstream>

#include "released.h"
#include "tensormap/skeleton.h"

namespace tensormap {
namespace {

constexpr auto kReleasedBit = c10::BackendComponent::PrivateUse1Bit;

bool has_released_bit(const at::Tensor& t) {
  return t.defined() && t.key_set().has_backend(kReleasedBit);
}

[[noreturn]] void throw_released(const c10::OperatorName& op, const at::Tensor& t) {
  std::ostringstream shape;
  shape << t.sizes();
  TORCH_CHECK(false, "tensormap: ", op, " was called on a released tensor (shape ", shape.str(),
              ", ", t.dtype(), ") that holds no data; load a checkpoint into its module "
              "(tensormap::load) before using it");
}

void check_arguments(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const size_t n = op.schema().arguments().size();
  for (size_t i = stack.size() - n; i < stack.size(); ++i) {
    const c10::IValue& v = stack[i];
    if (v.isTensor()) {
      if (has_released_bit(v.toTensor())) throw_released(op.operator_name(), v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList().vec()) {
        if (has_released_bit(t)) throw_released(op.operator_name(), t);
      }
    } else if (v.isOptionalTensorList()) {
      for (const c10::optional<at::Tensor>& t : v.toOptionalTensorList().vec()) {
        if (t && has_released_bit(*t)) throw_released(op.operator_name(), *t);
      }
    }
  }
}

// Every operator that lands on PrivateUse1: refuse released tensors, else run the real
// kernel.
void checked_passthrough(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                         torch::jit::Stack* stack) {
  check_arguments(op, *stack);
  op.redispatchBoxed(keys.remove_backend(kReleasedBit), stack);
}

at::Tensor& skip_uniform(at::Tensor& self, double, double, c10::optional<at::Generator>) {
  if (has_released_bit(self)) throw_released(c10::OperatorName("aten::uniform_", ""), self);
  return self;
}

at::Tensor& skip_normal(at::Tensor& self, double, double, c10::optional<at::Generator>) {
  if (has_released_bit(self)) throw_released(c10::OperatorName("aten::normal_", ""), self);
  return self;
}

}  // namespace
}  // namespace tensormap

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&tensormap::checked_passthrough>());
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("uniform_", tensormap::skip_uniform);
  m.impl("normal_", tensormap::skip_normal);
  // Composite kernels registered for all backends win over a fallback: the ones a
  // released parameter can plausibly meet are registered here so that they check too.
  // (Only CompositeExplicitAutograd ops: a backend kernel on an implicit one would take
  // its autograd formula away. A test checks this list.)
  for (const char* op : tensormap::detail::explicitly_checked_ops()) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&tensormap::checked_passthrough>());
  }
}

namespace tensormap {

SkeletonScope::SkeletonScope() : saved_(c10::impl::tls_local_dispatch_key_set()) {
  c10::impl::tls_set_dispatch_key_included(c10::DispatchKey::PrivateUse1, true);
}

SkeletonScope::~SkeletonScope() { c10::impl::_force_tls_local_dispatch_key_set(saved_); }

bool is_released(const at::Tensor& tensor) { return has_released_bit(tensor); }

void release(torch::nn::Module& module) {
  at::NoGradGuard no_grad;
  auto release_one = [](at::Tensor& t) {
    if (!t.defined() || has_released_bit(t)) return;
    const auto nbytes = static_cast<size_t>(t.numel()) * t.element_size();
    c10::Storage empty(c10::Storage::use_byte_size_t(), nbytes,
                       c10::DataPtr(nullptr, t.device()), /*allocator=*/nullptr,
                       /*resizable=*/false);
    t.set_(empty, 0, t.sizes(), t.strides());
    t.unsafeGetTensorImpl()->_change_backend_component_keys(
        c10::Device(c10::DeviceType::PrivateUse1));
  };
  for (auto& p : module.parameters(/*recurse=*/true)) release_one(p);
  for (auto& b : module.buffers(/*recurse=*/true)) release_one(b);
}

namespace detail {

const std::vector<const char*>& explicitly_checked_ops() {
  static const std::vector<const char*> ops = {
      "clone",        "copy_",     "_to_copy",     "detach",       "alias",
      "t",            "transpose.int", "select.int", "slice.Tensor", "expand",
      "unsqueeze",    "squeeze",   "permute",      "embedding",    "unbind.int",
      "split.Tensor"};
  return ops;
}

void prepare_to_bind(const at::Tensor& tensor) {
  if (has_released_bit(tensor)) {
    tensor.unsafeGetTensorImpl()->_change_backend_component_keys(c10::Device(c10::kCPU));
  }
}

}  // namespace detail
}  // namespace tensormap
