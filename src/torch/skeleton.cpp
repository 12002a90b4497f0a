// Skeletons and released tensors, both built on the PrivateUse1 dispatch key.
//
// Released: a released tensor has no data (a null storage of the right size) and its
// backend dispatch bit is switched from CPU to PrivateUse1. Every operator on it thus
// reaches PrivateUse1, where the kernels below see a released argument. Outside a skeleton
// scope they throw: nothing ever computes on missing data. Composite operators (clone,
// copy_, views...) have kernels for every backend that would bypass a fallback; they are
// registered explicitly below so they check too.
//
// Skeleton scope: a thread-local "include PrivateUse1" guard routes every operator
// through PrivateUse1 first, so the same kernels see everything a constructor does:
// - a write into a parameter (a leaf that requires grad: uniform_, erfinv_, mul_,
//   clamp_, fill_, copy_, index_put_, any in-place or out= op) releases the parameter
//   and does nothing else, so initialisation never makes a weight resident;
// - a write into a tensor already released does nothing;
// - an out-of-place operator that reads a released tensor runs on the meta device for
//   the shapes and returns released tensors of those shapes (or, with no meta kernel,
//   fails naming the operator): values computed from weights stay skeletons too;
// - random fills (uniform_, normal_) of any tensor do nothing;
// - everything else (tensors computed from scratch: buffers, tables) runs for real.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/strides.h>
#include <torch/library.h>
#include <torch/nn.h>
#include <torch/version.h>

#include <exception>
#include <fstream>
#include <memory>
#include <sstream>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "released.h"
#include "tensormap/error.h"
#include "tensormap/skeleton.h"

namespace tensormap {
namespace {

constexpr auto kReleasedBit = c10::BackendComponent::PrivateUse1Bit;

bool has_released_bit(const at::Tensor& t) { return t.defined() && t.key_set().has_backend(kReleasedBit); }

// True while a SkeletonScope is open on this thread and not suspended.
bool in_skeleton_scope() { return c10::impl::tls_local_dispatch_key_set().included_.has_backend(kReleasedBit); }

// Suspends this thread's skeleton scope while it lives: what runs inside is plain LibTorch
// (releasing a tensor, a shape run on the meta device, materialize's initialisers).
// (Removing the DispatchKey would drop only the Dense functionality bit and leave the
// PrivateUse1 backend bit, which still routes every operator here.)
class OutsideSkeleton {
 public:
  OutsideSkeleton() : saved_(c10::impl::tls_local_dispatch_key_set()) {
    c10::impl::LocalDispatchKeySet outside = saved_;
    outside.included_ = outside.included_.remove_backend(kReleasedBit);
    c10::impl::_force_tls_local_dispatch_key_set(outside);
  }
  ~OutsideSkeleton() { c10::impl::_force_tls_local_dispatch_key_set(saved_); }
  OutsideSkeleton(const OutsideSkeleton&) = delete;
  OutsideSkeleton& operator=(const OutsideSkeleton&) = delete;

 private:
  c10::impl::LocalDispatchKeySet saved_;
};

// A parameter as a constructor makes it: a CPU leaf that requires grad. Inside a skeleton
// scope, the values written into one are the initialisation a load replaces.
bool is_parameter(const at::Tensor& t) {
  return t.defined() && t.requires_grad() && t.is_leaf() && t.device().is_cpu();
}

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes() << ", " << t.dtype();
  return out.str();
}

// What a released tensor's null storage carries when a load left it released because
// the checkpoint lacked it: its name and the checkpoint, for the error message.
struct MissingNote {
  std::string name;
  std::string checkpoint;
};

void delete_note(void* note) { delete static_cast<MissingNote*>(note); }

const MissingNote* missing_note(const at::Tensor& t) {
  const c10::DataPtr& data = t.unsafeGetTensorImpl()->unsafe_storage().data_ptr();
  if (data.get_deleter() != &delete_note) return nullptr;
  return static_cast<const MissingNote*>(data.get_context());
}

[[noreturn]] void throw_released(const c10::OperatorName& op, const at::Tensor& t) {
  std::ostringstream shape;
  shape << t.sizes();
  if (const MissingNote* note = missing_note(t)) {
    TORCH_CHECK(false, "tensormap: ", op, " was called on '", note->name, "' (shape ", shape.str(), ", ", t.dtype(),
                "), which holds no data: the checkpoint ", note->checkpoint,
                " has no tensor of that name, so loading it left this one released. "
                "Give it memory with tensormap::materialize(module) (Python: tensormap.materialize), "
                "or load a checkpoint that has it");
  }
  TORCH_CHECK(false, "tensormap: ", op, " was called on a released tensor (shape ", shape.str(), ", ", t.dtype(),
              ") that holds no data: its module was built as a skeleton "
              "and not loaded yet. Load a checkpoint into its module (tensormap::load) "
              "before using it, or give it memory with tensormap::materialize(module) (Python: "
              "tensormap.materialize)");
}

// Makes `t` a released tensor of `sizes` and `strides`: a null storage of the bytes those
// reach (carrying `note`, which it then owns, if not null) and the PrivateUse1 backend
// bit. Allocates nothing. REQUIRES: `t` is a CPU tensor.
void release_as(const at::Tensor& t, at::IntArrayRef sizes, at::IntArrayRef strides, MissingNote* note) {
  int64_t extent = 1;  // elements the strides reach, 0 for an empty tensor
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 0) extent = 0;
  }
  if (extent != 0) {
    for (size_t d = 0; d < sizes.size(); ++d) extent += (sizes[d] - 1) * strides[d];
  }
  const auto nbytes = static_cast<size_t>(extent) * t.element_size();
  c10::DataPtr data = note ? c10::DataPtr(nullptr, note, &delete_note, c10::Device(c10::kCPU))
                           : c10::DataPtr(nullptr, c10::Device(c10::kCPU));
  c10::Storage empty(c10::Storage::use_byte_size_t(), nbytes, std::move(data),
                     /*allocator=*/nullptr, /*resizable=*/false);
  OutsideSkeleton outside;  // set_ writes a parameter: inside the scope, that would release it
  at::NoGradGuard no_grad;
  at::Tensor target = t;
  target.set_(empty, 0, sizes, strides);
  t.unsafeGetTensorImpl()->_change_backend_component_keys(c10::Device(c10::DeviceType::PrivateUse1));
}

// Makes `t` released in place, keeping its shape and strides.
void release_in_place(const at::Tensor& t, MissingNote* note) {
  const std::vector<int64_t> sizes = t.sizes().vec(), strides = t.strides().vec();
  release_as(t, sizes, strides, note);
}

// Calls `visit` with every tensor of the arguments on top of `stack` (in lists too), and
// whether the operator writes it.
template <typename Visit>
void for_each_tensor_argument(const c10::OperatorHandle& op, const torch::jit::Stack& stack, Visit&& visit) {
  const auto& args = op.schema().arguments();
  const size_t first = stack.size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = stack[first + i];
    const bool written = args[i].alias_info() != nullptr && args[i].alias_info()->isWrite();
    if (v.isTensor()) {
      visit(v.toTensor(), written);
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList().vec()) visit(t, written);
    } else if (v.isOptionalTensorList()) {
      for (const c10::optional<at::Tensor>& t : v.toOptionalTensorList().vec()) {
        if (t) visit(*t, written);
      }
    }
  }
}

void check_arguments(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  for_each_tensor_argument(op, stack, [&](const at::Tensor& t, bool /*written*/) {
    if (has_released_bit(t)) throw_released(op.operator_name(), t);
  });
}

// Every operator that lands on PrivateUse1 outside a skeleton scope: refuse released
// tensors, else run the real kernel.
void checked_passthrough(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  check_arguments(op, *stack);
  op.redispatchBoxed(keys.remove_backend(kReleasedBit), stack);
}

// A released tensor of `sizes`/`strides`, `dtype` on the CPU. Allocates nothing.
at::Tensor make_released(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype) {
  at::Tensor t = at::empty({0}, at::TensorOptions().dtype(dtype).device(at::kCPU));
  release_as(t, sizes, strides, nullptr);
  return t;
}

// Operators whose `Tensor(a!)` argument has its description changed, not its values
// written: a load binds storage with set_, and a skeleton's tensors are never given
// another shape. They only pass through (or refuse a released tensor).
bool changes_description_only(const c10::OperatorName& name) {
  static const std::unordered_set<std::string> ops = {
      "aten::set_",       "aten::resize_", "aten::resize_as_", "aten::as_strided_", "aten::detach_",  "aten::squeeze_",
      "aten::unsqueeze_", "aten::t_",      "aten::transpose_", "aten::swapdims_",   "aten::swapaxes_"};
  return ops.count(name.name) != 0;
}

// Skips an operator that writes a skeleton's tensors: pops its arguments and pushes what
// it would have returned, the written arguments themselves.
void skip_write(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const auto& args = schema.arguments();
  const size_t first = stack->size() - args.size();
  std::vector<c10::IValue> results;
  for (const auto& ret : schema.returns()) {
    size_t source = args.size();
    for (size_t i = 0; ret.alias_info() != nullptr && i < args.size() && source == args.size(); ++i) {
      if (args[i].alias_info() != nullptr && args[i].alias_info()->beforeSets() == ret.alias_info()->beforeSets()) {
        source = i;
      }
    }
    TORCH_CHECK(source < args.size(), "tensormap: ", op.operator_name(),
                " writes a tensor of a skeleton "
                "(inside a skeleton scope) and also returns a new value, which cannot exist before a checkpoint is "
                "loaded; call it outside the scope or after loading");
    results.push_back((*stack)[first + source]);
  }
  torch::jit::drop(*stack, args.size());
  for (auto& r : results) torch::jit::push(*stack, std::move(r));
}

// The same description on the meta device: a tensor of the same sizes, strides and dtype
// that holds nothing, released or not.
c10::IValue to_meta(const c10::IValue& v) {
  const auto on_meta = [](const at::Tensor& t) {
    return at::empty_strided(t.sizes(), t.strides(), t.options().device(at::kMeta));
  };
  if (v.isTensor()) return on_meta(v.toTensor());
  if (v.isTensorList()) {
    c10::List<at::Tensor> list;
    for (const at::Tensor& t : v.toTensorList().vec()) list.push_back(on_meta(t));
    return list;
  }
  if (v.isOptionalTensorList()) {
    c10::List<c10::optional<at::Tensor>> list;
    for (const c10::optional<at::Tensor>& t : v.toOptionalTensorList().vec()) {
      list.push_back(t ? c10::optional<at::Tensor>(on_meta(*t)) : c10::nullopt);
    }
    return list;
  }
  return v;
}

// A meta result as a released CPU tensor of its description; anything else as it is.
c10::IValue from_meta(const c10::IValue& v) {
  const auto released = [](const at::Tensor& t) {
    return t.is_meta() ? make_released(t.sizes(), t.strides(), t.scalar_type()) : t;
  };
  if (v.isTensor()) return released(v.toTensor());
  if (v.isTensorList()) {
    c10::List<at::Tensor> list;
    for (const at::Tensor& t : v.toTensorList().vec()) list.push_back(released(t));
    return list;
  }
  return v;
}

// An out-of-place operator reading a released tensor inside a skeleton scope: its results
// depend on values a load has not given yet, so they are released tensors too, described
// by the operator's meta kernel.
void follow_on_meta(const c10::OperatorHandle& op, torch::jit::Stack* stack, const at::Tensor& released) {
  const size_t n = op.schema().arguments().size();
  torch::jit::Stack meta;
  OutsideSkeleton outside;
  for (size_t i = stack->size() - n; i < stack->size(); ++i) meta.push_back(to_meta((*stack)[i]));
  try {
    op.callBoxed(&meta);
  } catch (const std::exception& e) {  // c10::Error, or (torch 2.x) a Python meta kernel's error
    const auto* torch_error = dynamic_cast<const c10::Error*>(&e);
    std::string what = torch_error ? torch_error->what_without_backtrace() : e.what();
    what = what.substr(0, std::min(what.find('\n'), what.find(". ")));  // LibTorch's first sentence
    TORCH_CHECK(false, "tensormap: ", op.operator_name(),
                " was called inside a skeleton scope on a tensor of "
                "the skeleton (",
                shape_of(released),
                "), whose values do not exist until a checkpoint is "
                "loaded, and the skeleton cannot follow it on the meta device (",
                what, "). Compute this value outside the scope or after loading");
  }
  torch::jit::drop(*stack, n);
  for (const c10::IValue& v : meta) torch::jit::push(*stack, from_meta(v));
}

// set_ and copy_ into a released tensor from tensors that hold data give it data: set_
// binds it to their storage (as a load does); copy_, outside a skeleton scope, gives it
// memory of its own and fills it whole (load_state_dict into a skeleton). Neither reads
// the missing values. False for any other call, which then goes the usual way.
bool bind_released(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const std::string& name = op.operator_name().name;
  const bool is_set = name == "aten::set_", is_copy = name == "aten::copy_";
  if (!(is_set || (is_copy && !in_skeleton_scope()))) return false;
  const size_t n = op.schema().arguments().size(), first = stack->size() - n;
  if (!(*stack)[first].isTensor() || !has_released_bit((*stack)[first].toTensor())) return false;
  for (size_t i = first + 1; i < stack->size(); ++i) {
    if ((*stack)[i].isTensor() && has_released_bit((*stack)[i].toTensor())) return false;
  }
  const at::Tensor self = (*stack)[first].toTensor();
  {
    OutsideSkeleton outside;
    at::NoGradGuard no_grad;
    const at::Tensor memory =
        is_copy ? at::empty_strided(self.sizes(), self.strides(), self.options().device(at::kCPU)) : at::Tensor();
    detail::prepare_to_bind(self);
    if (memory.defined()) at::Tensor(self).set_(memory);
  }
  op.redispatchBoxed(keys.remove_backend(kReleasedBit), stack);
  return true;
}

// Every operator that lands on PrivateUse1. Outside a skeleton scope that is an operator
// on a released tensor, which it refuses. Inside one, see the file's opening comment.
void on_private_use(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (bind_released(op, keys, stack)) return;
  if (!in_skeleton_scope() || changes_description_only(op.operator_name())) {
    checked_passthrough(op, keys, stack);
    return;
  }
  bool writes_skeleton = false, writes = false;
  at::Tensor read_released;
  for_each_tensor_argument(op, *stack, [&](const at::Tensor& t, bool written) {
    writes = writes || written;
    if (written && (has_released_bit(t) || is_parameter(t))) writes_skeleton = true;
    if (!written && !read_released.defined() && has_released_bit(t)) read_released = t;
  });
  if (!writes_skeleton && !read_released.defined()) {
    op.redispatchBoxed(keys.remove_backend(kReleasedBit), stack);
    return;
  }
  if (!writes) {
    follow_on_meta(op, stack, read_released);
    return;
  }
  // A write into the skeleton, or of values computed from it: every tensor written is
  // (or becomes) released, and nothing is computed. A parameter's initialisation ends
  // here; so does a composite kernel's out= call into the output it just allocated.
  for_each_tensor_argument(op, *stack, [&](const at::Tensor& t, bool written) {
    if (!written || has_released_bit(t)) return;
    TORCH_CHECK(is_parameter(t) || t.storage().use_count() == 1, "tensormap: ", op.operator_name(),
                " was called inside a skeleton scope to write values computed from a tensor of the skeleton (",
                shape_of(read_released.defined() ? read_released : t), ") into part of a tensor that is not one (",
                shape_of(t),
                "); those values do not exist until a checkpoint is loaded. Compute it outside the "
                "scope or after loading");
    release_in_place(t, nullptr);
  });
  skip_write(op, stack);
}

// aten::_to_copy, which Tensor::to and so Module::to reach. On a released tensor it makes
// another released tensor, described as asked, at no cost: a skeleton can be given the
// checkpoint's dtype before it is loaded. Like PyTorch's nn.Module.to (and unlike
// LibTorch's C++ Module::to), a floating-point dtype applies to floating-point and complex
// tensors only; bool and integer buffers keep theirs, as checkpoints hold them. Any
// other tensor goes to the real kernel.
void released_to_copy(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  const at::Tensor self = (*stack)[first].toTensor();
  if (!has_released_bit(self)) {
    on_private_use(op, keys, stack);
    return;
  }
  auto argument = [&](const char* name) -> const c10::IValue& {
    for (size_t i = 0; i < args.size(); ++i) {
      if (args[i].name() == name) return (*stack)[first + i];
    }
    TORCH_CHECK(false, "tensormap: aten::_to_copy has no argument '", name, "' in LibTorch ", TORCH_VERSION);
  };
  const c10::IValue& dtype_arg = argument("dtype");
  const c10::IValue& device_arg = argument("device");
  const c10::IValue& layout_arg = argument("layout");
  const c10::IValue& format_arg = argument("memory_format");
  if (!device_arg.isNone()) {
    const c10::Device device = device_arg.toDevice();
    TORCH_CHECK(device.is_cpu(),
                "tensormap: a released tensor (a skeleton's parameter) can "
                "only be moved to the CPU, not to ",
                device,
                "; load the checkpoint first, then "
                "move the model");
  }
  TORCH_CHECK(layout_arg.isNone() || layout_arg.toLayout() == at::kStrided,
              "tensormap: a released tensor can only be given the strided layout");
  at::ScalarType dtype = self.scalar_type();
  if (!dtype_arg.isNone()) {
    const at::ScalarType wanted = dtype_arg.toScalarType();
    const bool self_real = at::isFloatingType(dtype) || at::isComplexType(dtype);
    const bool wanted_real = at::isFloatingType(wanted) || at::isComplexType(wanted);
    if (self_real || !wanted_real) dtype = wanted;
  }
  const auto format = format_arg.isNone() ? at::MemoryFormat::Preserve : format_arg.toMemoryFormat();
  std::vector<int64_t> strides;
  if (format == at::MemoryFormat::Preserve && self.is_non_overlapping_and_dense()) {
    strides = self.strides().vec();
  } else if (format == at::MemoryFormat::ChannelsLast && self.dim() == 4) {
    strides = c10::get_channels_last_strides_2d(self.sizes());
  } else if (format == at::MemoryFormat::ChannelsLast3d && self.dim() == 5) {
    strides = c10::get_channels_last_strides_3d(self.sizes());
  } else {
    const auto contiguous = c10::contiguous_strides(self.sizes());
    strides.assign(contiguous.begin(), contiguous.end());
  }
  at::Tensor out = make_released(self.sizes(), strides, dtype);
  torch::jit::drop(*stack, args.size());
  torch::jit::push(*stack, std::move(out));
}

// A random fill inside a skeleton scope does nothing; one into a parameter releases it.
// Outside a scope only a released tensor arrives here, and is refused.
at::Tensor& skip_random_fill(const char* op, at::Tensor& self) {
  if (!in_skeleton_scope()) throw_released(c10::OperatorName(op, ""), self);
  if (!has_released_bit(self) && is_parameter(self)) release_in_place(self, nullptr);
  return self;
}

at::Tensor& skip_uniform(at::Tensor& self, double, double, c10::optional<at::Generator>) {
  return skip_random_fill("aten::uniform_", self);
}

at::Tensor& skip_normal(at::Tensor& self, double, double, c10::optional<at::Generator>) {
  return skip_random_fill("aten::normal_", self);
}

}  // namespace
}  // namespace tensormap

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&tensormap::on_private_use>());
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("uniform_", tensormap::skip_uniform);
  m.impl("normal_", tensormap::skip_normal);
  // Composite kernels registered for all backends win over a fallback: the ones a
  // released parameter can plausibly meet are registered here so that they check too.
  // (Only CompositeExplicitAutograd ops: a backend kernel on an implicit one would take
  // its autograd formula away. A test checks this list.)
  for (const char* op : tensormap::detail::explicitly_checked_ops()) {
    if (std::string_view(op) == "_to_copy") continue;
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&tensormap::on_private_use>());
  }
  m.impl("_to_copy", torch::CppFunction::makeFromBoxedFunction<&tensormap::released_to_copy>());
}

namespace tensormap {

SkeletonScope::SkeletonScope() : saved_(c10::impl::tls_local_dispatch_key_set()) {
  c10::impl::tls_set_dispatch_key_included(c10::DispatchKey::PrivateUse1, true);
}

SkeletonScope::~SkeletonScope() { c10::impl::_force_tls_local_dispatch_key_set(saved_); }

bool is_released(const at::Tensor& tensor) { return has_released_bit(tensor); }

void detail::rethrow_skeleton_failure() {
  const std::exception_ptr current = std::current_exception();
  std::string what;
  try {
    std::rethrow_exception(current);
  } catch (const c10::Error& e) {
    what = e.what_without_backtrace();
  } catch (...) {}
  std::ifstream mode_file("/proc/sys/vm/overcommit_memory");
  int mode = 0;
  if (what.find("can't allocate memory") == std::string::npos || !(mode_file >> mode) || mode != 2) {
    std::rethrow_exception(current);
  }
  throw Error(
      ErrorKind::Io,
      "build_skeleton: the system accounts memory strictly (vm.overcommit_memory = 2), so the tensors the "
      "model's constructor allocates are charged in full although a skeleton never touches them, and the "
      "allocator was refused (" +
          what.substr(0, what.find('\n')) +
          "). A model larger than the commit "
          "limit (CommitLimit in /proc/meminfo) cannot be built here: use vm.overcommit_memory 0 or 1, or add swap");
}

void release(const at::Tensor& t) {
  if (!t.defined() || has_released_bit(t)) return;
  TORCH_CHECK(t.device().is_cpu(), "tensormap::release: tensors on ", t.device(),
              " cannot be released; skeletons are built on the CPU");
  at::NoGradGuard no_grad;
  release_in_place(t, nullptr);
}

void release(const at::Tensor& t, at::IntArrayRef sizes) {
  if (!t.defined() || !t.device().is_cpu()) {
    throw Error(ErrorKind::InvalidArgument, "tensormap::release: only a defined CPU tensor can be released as a shape");
  }
  for (const int64_t s : sizes) {
    if (s < 0) throw Error(ErrorKind::InvalidArgument, "tensormap::release: a negative size in the shape");
  }
  const auto strides = c10::contiguous_strides(sizes);
  at::NoGradGuard no_grad;
  if (has_released_bit(t)) detail::prepare_to_bind(t);  // set_ reaches only a CPU tensor
  release_as(t, sizes, std::vector<int64_t>(strides.begin(), strides.end()), nullptr);
}

void release(torch::nn::Module& module) {
  for (auto& p : module.parameters(/*recurse=*/true)) release(p);
  for (auto& b : module.buffers(/*recurse=*/true)) release(b);
}

namespace {

template <typename Impl>
bool reset_if(torch::nn::Module& m) {
  auto* impl = dynamic_cast<Impl*>(&m);
  if (impl) impl->reset_parameters();
  return impl != nullptr;
}

// Runs the initialisation torch::nn gives a module of its own type, over all of its own
// tensors; false for a type it does not know.
bool reset_as_torch_nn(torch::nn::Module& m) {
  using namespace torch::nn;
  if (auto* mha = dynamic_cast<MultiheadAttentionImpl*>(&m)) {
    mha->_reset_parameters();
    return true;
  }
  return reset_if<LinearImpl>(m) || reset_if<BilinearImpl>(m) || reset_if<Conv1dImpl>(m) || reset_if<Conv2dImpl>(m) ||
         reset_if<Conv3dImpl>(m) || reset_if<ConvTranspose1dImpl>(m) || reset_if<ConvTranspose2dImpl>(m) ||
         reset_if<ConvTranspose3dImpl>(m) || reset_if<EmbeddingImpl>(m) || reset_if<EmbeddingBagImpl>(m) ||
         reset_if<LayerNormImpl>(m) || reset_if<GroupNormImpl>(m) || reset_if<BatchNorm1dImpl>(m) ||
         reset_if<BatchNorm2dImpl>(m) || reset_if<BatchNorm3dImpl>(m) || reset_if<InstanceNorm1dImpl>(m) ||
         reset_if<InstanceNorm2dImpl>(m) || reset_if<InstanceNorm3dImpl>(m) || reset_if<RNNImpl>(m) ||
         reset_if<LSTMImpl>(m) || reset_if<GRUImpl>(m);
}

}  // namespace

std::vector<std::string> materialize(torch::nn::Module& module, const TensorInitializer& init,
                                     const ModuleInitializer& reset) {
  OutsideSkeleton outside;  // initialisers must run even inside a SkeletonScope

  // First every released tensor gets zeroed memory, then each module's rule runs over
  // its own: a rule that reaches into a child (MultiheadAttention's into its out_proj)
  // finds memory there, and each tensor is initialised by the rule of the module that
  // holds it. A tensor tied under several names belongs to the first.
  struct Owner {
    std::string name;
    std::shared_ptr<torch::nn::Module> module;
    std::vector<std::pair<std::string, at::Tensor>> fresh;
  };
  std::vector<Owner> owners;
  for (const auto& item : module.named_modules()) {
    torch::nn::Module& m = *item.value();
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    Owner owner{item.key(), item.value(), {}};
    for (const auto& p : m.named_parameters(/*recurse=*/false)) {
      if (has_released_bit(p.value())) owner.fresh.emplace_back(prefix + p.key(), p.value());
    }
    for (const auto& b : m.named_buffers(/*recurse=*/false)) {
      if (b.value().defined() && has_released_bit(b.value())) owner.fresh.emplace_back(prefix + b.key(), b.value());
    }
    if (owner.fresh.empty()) continue;
    at::NoGradGuard no_grad;
    for (auto& [name, t] : owner.fresh) {
      detail::prepare_to_bind(t);
      t.set_(at::zeros(t.sizes(), t.options()));
    }
    owners.push_back(std::move(owner));
  }

  std::vector<std::string> done;
  for (Owner& owner : owners) {
    torch::nn::Module& m = *owner.module;
    // The rule may write any tensor of the module's subtree: all but the module's own
    // fresh ones sit out, each swapped for a scratch tensor, and come back untouched.
    std::unordered_set<const c10::TensorImpl*> seen;
    for (const auto& [name, t] : owner.fresh) seen.insert(t.unsafeGetTensorImpl());
    std::vector<at::Tensor> kept, loaded;
    {
      const auto keep = [&](const at::Tensor& t) {
        if (t.defined() && seen.insert(t.unsafeGetTensorImpl()).second) kept.push_back(t);
      };
      for (const auto& p : m.parameters(/*recurse=*/true)) keep(p);
      for (const auto& b : m.buffers(/*recurse=*/true)) keep(b);
      at::NoGradGuard no_grad;
      for (auto& t : kept) {
        loaded.push_back(at::empty({0}, t.options()).set_(t));
        t.set_(at::empty_strided(t.sizes(), t.strides(), t.options()));
      }
    }
    const auto put_back = [&] {
      at::NoGradGuard no_grad;
      for (size_t i = 0; i < kept.size(); ++i) kept[i].set_(loaded[i]);
    };
    try {
      // A module with no rule keeps the zeros it was given.
      at::NoGradGuard no_grad;
      if (reset) {
        reset(owner.name, m);
      } else {
        reset_as_torch_nn(m);
      }
    } catch (...) {
      put_back();
      throw;
    }
    put_back();
    for (auto& [name, t] : owner.fresh) {
      if (init) {
        at::NoGradGuard no_grad;
        init(name, t);
      }
      done.push_back(name);
    }
  }
  return done;
}

namespace detail {

const std::vector<const char*>& explicitly_checked_ops() {
  static const std::vector<const char*> ops = {
      "clone",        "copy_",  "_to_copy",  "detach",  "alias",   "t",         "transpose.int", "select.int",
      "slice.Tensor", "expand", "unsqueeze", "squeeze", "permute", "embedding", "unbind.int",    "split.Tensor"};
  return ops;
}

void mark_missing(const at::Tensor& tensor, const std::string& name, const std::string& checkpoint) {
  if (!has_released_bit(tensor)) return;
  at::NoGradGuard no_grad;
  prepare_to_bind(tensor);
  release_in_place(tensor, new MissingNote{name, checkpoint});
}

void prepare_to_bind(const at::Tensor& tensor) {
  if (has_released_bit(tensor)) {
    tensor.unsafeGetTensorImpl()->_change_backend_component_keys(c10::Device(c10::kCPU));
  }
}

}  // namespace detail
}  // namespace tensormap
