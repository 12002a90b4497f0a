// Loading a torch::nn::Module from a tensormap file, and saving one into it.
#include <ATen/ATen.h>
#include <sys/mman.h>
#include <torch/nn/module.h>
#include <unistd.h>

#include <sstream>
#include <unordered_set>

#include "released.h"
#include "tensormap/error.h"
#include "tensormap/module.h"
#include "tensormap/tensor.h"
#include "tensormap/torch_save.h"
#include "tensormap/writer.h"

namespace tensormap {
namespace {

std::string shape_string(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << sizes;
  return out.str();
}

// Why the tensor described by `info` cannot be loaded into `target` in `mode`, or "".
std::string mismatch(const at::Tensor& target, const StateDict::Info& info, LoadMode mode) {
  const auto file_type = to_scalar_type(info.dtype);
  if (!file_type) {
    return "dtype " + std::string(dtype_name(info.dtype)) +
           " in the file has no LibTorch 1.13 equivalent";
  }
  if (target.sizes() != at::IntArrayRef(info.shape)) {
    return "shape " + shape_string(target.sizes()) + " in the model, " + shape_string(info.shape) +
           " in the file";
  }
  const std::string types = std::string("dtype ") + c10::toString(target.scalar_type()) +
                            " in the model, " + std::string(dtype_name(info.dtype)) +
                            " in the file";
  if (mode == LoadMode::Map) {
    if (*file_type != target.scalar_type()) {
      return types + " (map mode cannot convert; use LoadMode::Copy)";
    }
    if (!target.device().is_cpu()) return "map mode binds CPU tensors only";
  } else if (at::isComplexType(*file_type) && !at::isComplexType(target.scalar_type())) {
    return types + " (converting would drop the imaginary part)";
  }
  return "";
}

void append_list(std::ostringstream& out, const char* what, const std::vector<std::string>& items,
                 bool& first) {
  if (items.empty()) return;
  constexpr size_t kShown = 8;
  out << (first ? "" : "; ") << items.size() << " " << what << " (";
  for (size_t i = 0; i < items.size() && i < kShown; ++i) out << (i ? ", " : "") << items[i];
  if (items.size() > kShown) out << ", and " << items.size() - kShown << " more";
  out << ")";
  first = false;
}

// A fresh tensor whose pages are faulted in ahead, in one system call: page by page
// first-touch faults cost several times more, markedly so in virtual machines.
at::Tensor allocate_populated(const at::Tensor& like) {
  at::Tensor t = at::empty(like.sizes(), like.options());
#ifdef MADV_POPULATE_WRITE
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + page - 1) & ~(page - 1);
  const auto end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + t.nbytes()) & ~(page - 1);
  if (end > begin) {
    // Advisory: on kernels before 5.14 it fails with EINVAL and the copy faults instead.
    (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
  }
#endif
  return t;
}

}  // namespace

std::string LoadReport::summary() const {
  std::ostringstream out;
  bool first = true;
  append_list(out, "missing from the file", missing, first);
  append_list(out, "unexpected in the file", unexpected, first);
  append_list(out, "mismatched", mismatched, first);
  if (first) out << loaded.size() << " tensors loaded, no problems";
  return out.str();
}

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

LoadReport load(torch::nn::Module& module, const StateDict& state, const LoadOptions& options) {
  struct Binding {
    at::Tensor target;
    const std::string* name;
  };
  const auto model_state = named_state(module);
  LoadReport report;
  std::vector<Binding> plan;
  std::unordered_set<std::string_view> model_names;
  for (const auto& [name, tensor] : model_state) {
    model_names.insert(name);
    if (!state.contains(name)) {
      report.missing.push_back(name);
      continue;
    }
    if (auto why = mismatch(tensor, state.info(name), options.mode); !why.empty()) {
      report.mismatched.push_back(name + ": " + why);
      continue;
    }
    plan.push_back({tensor, &name});
  }
  for (const std::string& name : state.keys()) {
    if (!model_names.count(name)) report.unexpected.push_back(name);
  }
  if (options.strict && !report.complete()) {
    throw Error(ErrorKind::ModelMismatch, "the " + state.format() +
                                              " checkpoint does not match the model, nothing was loaded: " +
                                              report.summary());
  }

  at::NoGradGuard no_grad;
  for (Binding& b : plan) {
    at::Tensor& target = b.target;
    if (options.mode == LoadMode::Map) {
      detail::prepare_to_bind(target);
      target.set_(state.at(*b.name));
    } else {
      // Copy mode reads with pread rather than through the mapping: no SIGBUS if the file
      // shrinks meanwhile, and no mapped pages to fault in.
      if (is_released(target)) {
        detail::prepare_to_bind(target);
        target.set_(allocate_populated(target));
      }
      const StateDict::Info info = state.info(*b.name);
      if (*to_scalar_type(info.dtype) == target.scalar_type() && target.is_contiguous()) {
        state.read(*b.name, target.data_ptr());
      } else {
        const at::Tensor raw = state.raw_bytes(*b.name);
        target.copy_(raw.view(*to_scalar_type(info.dtype)).view(info.shape));
      }
      state.release(*b.name);
    }
    report.loaded.push_back(*b.name);
  }
  return report;
}

LoadReport load(torch::nn::Module& module, const File& file, const LoadOptions& options) {
  try {
    return load(module, StateDict(file), options);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::ModelMismatch) throw;
    throw Error(e.kind(), file.path() + ": " + e.what());
  }
}

LoadReport load(torch::nn::Module& module, const std::string& path, const LoadOptions& options) {
  try {
    return load(module, StateDict::open(path), options);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::ModelMismatch) throw;
    throw Error(e.kind(), path + ": " + e.what());
  }
}

void save(const std::vector<std::pair<std::string, at::Tensor>>& tensors, const std::string& path,
          const SaveOptions& options) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) {
      throw Error(ErrorKind::InvalidArgument, path + ": tensor '" + name + "' is undefined");
    }
    if (is_released(t)) {
      throw Error(ErrorKind::InvalidArgument,
                  path + ": tensor '" + name + "' was released and holds no data to save");
    }
    std::vector<uint64_t> shape(t.sizes().begin(), t.sizes().end());
    Dtype dtype;
    try {
      dtype = from_scalar_type(t.scalar_type());
    } catch (const Error& e) {
      throw Error(ErrorKind::UnsupportedDtype, path + ": tensor '" + name + "': " + e.what());
    }
    specs.push_back({name, dtype, std::move(shape)});
  }
  if (options.format == Format::TorchSave) {
    TorchSaveWriter writer(path, std::move(specs), options.sync);
    for (const auto& item : tensors) {
      at::Tensor t = item.second.detach();
      if (!t.device().is_cpu()) t = t.cpu();
      t = t.resolve_conj().resolve_neg().contiguous();
      if (t.nbytes() > 0) writer.write_tensor(t.data_ptr(), t.nbytes());
    }
    writer.commit();
    return;
  }
  WriterOptions writer_options;
  writer_options.alignment = options.alignment;
  writer_options.metadata = options.metadata;
  writer_options.sync = options.sync;
  writer_options.format = options.format;
  Writer writer(path, std::move(specs), writer_options);
  for (const auto& item : tensors) {
    // One tensor at a time: at most one contiguous copy exists at once.
    at::Tensor t = item.second.detach();
    if (!t.device().is_cpu()) t = t.cpu();
    if (t.is_conj()) t = t.resolve_conj();
    if (t.is_neg()) t = t.resolve_neg();
    if (!t.is_contiguous()) t = t.contiguous();
    const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
    if (nbytes > 0) writer.write_tensor(t.data_ptr(), nbytes);
  }
  writer.commit();
}

void save(const torch::nn::Module& module, const std::string& path, const SaveOptions& options) {
  save(named_state(module), path, options);
}

}  // namespace tensormap
