// tensormap._C: the C++ core and LibTorch layer for the Python package (tensormap/__init__.py
// holds the Pythonic API over it). Torch tensors cross as at::Tensor handles of the same
// TensorImpl, so a load binds the very parameter objects a Python nn.Module holds.
//
// Every tensormap::Error leaves as tensormap.Error with its kind's name in `.kind`; a
// c10::Error raised under these functions leaves as tensormap.Error of kind "LibTorch".
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tensormap/convert.h"
#include "tensormap/error.h"
#include "tensormap/file.h"
#include "tensormap/interrupt.h"
#include "tensormap/load.h"
#include "tensormap/save.h"
#include "tensormap/sharded.h"
#include "tensormap/skeleton.h"
#include "tensormap/state_dict.h"
#include "tensormap/tensor.h"
#include "tensormap/verify.h"

namespace py = pybind11;

namespace tensormap::python {
namespace {

// Ctrl-C (any Python signal handler that raises) interrupts a long call: the core checks
// between pieces of work, with the GIL taken just for the check, and the exception
// unwinds the call like any failure (a save keeps the old file and leaves no temporary).
InterruptCheck python_signals() {
  return [] {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  };
}

PyObject* error_type = nullptr;  // tensormap.Error, made at import

// Sets tensormap.Error as the Python exception being raised.
void set_error(const char* kind, const char* message) {
  py::object error = py::reinterpret_borrow<py::object>(error_type)(message);
  error.attr("kind") = kind;
  PyErr_SetObject(error_type, error.ptr());
}

// One module of a proxy tree: the Python model's tensors registered under their dotted
// names, so that the C++ load, prefault and save walk them as a torch::nn::Module. The
// handles are the Python tensors themselves: what the C++ side binds, Python sees.
struct Proxy : torch::nn::Module {
  std::shared_ptr<Proxy> child(const std::string& name) {
    for (const auto& item : named_children()) {
      if (item.key() == name) return std::static_pointer_cast<Proxy>(item.value());
    }
    return register_module(name, std::make_shared<Proxy>());
  }
};

struct Entry {
  std::string name;
  at::Tensor tensor;
  bool buffer;
};

std::shared_ptr<Proxy> proxy_of(const std::vector<Entry>& entries) {
  auto root = std::make_shared<Proxy>();
  for (const Entry& e : entries) {
    if (e.name.empty() || e.name.front() == '.' || e.name.back() == '.' || e.name.find("..") != std::string::npos) {
      throw Error(ErrorKind::InvalidArgument,
                  "the model has a tensor named '" + e.name + "', which is not a dotted name");
    }
    if (!e.tensor.defined()) continue;
    std::shared_ptr<Proxy> owner = root;
    size_t start = 0;
    for (size_t dot = e.name.find('.'); dot != std::string::npos; dot = e.name.find('.', start)) {
      owner = owner->child(e.name.substr(start, dot - start));
      start = dot + 1;
    }
    const std::string leaf = e.name.substr(start);
    if (e.buffer) {
      owner->register_buffer(leaf, e.tensor);
    } else {
      owner->register_parameter(leaf, e.tensor, e.tensor.requires_grad());
    }
  }
  return root;
}

LoadMode mode_of(const std::string& mode) {
  if (mode == "map") return LoadMode::Map;
  if (mode == "copy") return LoadMode::Copy;
  if (mode == "auto") return LoadMode::Auto;
  throw Error(ErrorKind::InvalidArgument, "mode must be \"map\", \"copy\" or \"auto\", not \"" + mode + "\"");
}

// The core's format_from_name, with Python's error for a name it does not know.
std::optional<Format> format_of(const std::optional<std::string>& name) {
  if (!name) return std::nullopt;
  if (const auto format = format_from_name(*name)) return format;
  throw Error(ErrorKind::InvalidArgument,
              "format must be \"tensormap\", \"safetensors\" or \"torch.save\", not \"" + *name + "\"");
}

// The core's dtype_from_name, with Python's error for a name it does not know.
std::optional<Dtype> dtype_of(const std::optional<std::string>& name) {
  if (!name) return std::nullopt;
  if (const auto dtype = dtype_from_name(*name)) return dtype;
  throw Error(ErrorKind::InvalidArgument, "no dtype is named \"" + *name + "\" (F16, BF16, F32, F64)");
}

py::dict report_dict(const LoadReport& report) {
  py::dict out;
  out["loaded"] = report.loaded;
  out["missing"] = report.missing;
  out["unexpected"] = report.unexpected;
  out["mismatched"] = report.mismatched;
  return out;
}

py::dict info_dict(const StateDict::Info& info) {
  py::dict out;
  out["dtype"] = std::string(dtype_name(info.dtype));
  out["shape"] = info.shape;
  out["byte_length"] = info.byte_length;
  return out;
}

// The background prefault of a Python model: the proxy keeps the tensor handles alive.
struct Background {
  std::shared_ptr<Proxy> proxy;
  std::optional<BackgroundPrefault> prefault;
};

struct Scope {
  std::optional<SkeletonScope> scope;
};

// tensormap.Error, raised for every tensormap::Error and LibTorch error, and the kinds.
void bind_errors(py::module_& m) {
  error_type = PyErr_NewExceptionWithDoc(
      "tensormap.Error",
      "Every failure of tensormap: a malformed or corrupt file, a model that does not match, an I/O error.\n"
      "`kind` names the rule or operation that failed (\"BadMagic\", \"ChecksumMismatch\", \"ModelMismatch\", "
      "\"Io\", ...), as the C++ ErrorKind and the command line spell it; str() is the message.",
      PyExc_Exception, nullptr);
  m.add_object("Error", py::handle(error_type));
  py::register_exception_translator([](std::exception_ptr thrown) {
    try {
      if (thrown) std::rethrow_exception(thrown);
    } catch (const Error& e) {
      set_error(error_kind_name(e.kind()), e.what());
    } catch (const c10::Error& e) {
      set_error(error_kind_name(ErrorKind::LibTorch), e.what_without_backtrace());
    }
  });

  m.def("error_kinds", [] {
    std::vector<std::string> names;
    for (int k = 0; k <= static_cast<int>(kLastErrorKind); ++k) {
      names.emplace_back(error_kind_name(static_cast<ErrorKind>(k)));
    }
    return names;
  });
}

// Opening a checkpoint of any format and reading its tensors.
void bind_reading(py::module_& m) {
  py::class_<StateDict>(m, "StateDict")
      .def_static("open", &StateDict::open, py::arg("path"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("path", [](const StateDict& s) { return s.checkpoint().path(); })
      .def_property_readonly("format", [](const StateDict& s) { return std::string(format_name(s.format())); })
      .def("keys", &StateDict::keys)
      .def("__len__", &StateDict::size)
      .def("__contains__", [](const StateDict& s, const std::string& name) { return s.contains(name); })
      .def("metadata", &StateDict::metadata)
      .def("skipped", &StateDict::skipped)
      .def("info", [](const StateDict& s, const std::string& name) { return info_dict(s.info(name)); })
      .def("alias_of", [](const StateDict& s, const std::string& name) { return s.checkpoint().alias_of(name); })
      .def("at", [](const StateDict& s, const std::string& name) { return s.at(name); })
      .def("raw_bytes", [](const StateDict& s, const std::string& name) { return s.raw_bytes(name); })
      .def("slice", [](const StateDict& s, const std::string& name, int64_t dim, int64_t start, int64_t length) {
        return s.slice(name, dim, start, length);
      });
}

// Loading a model (through the proxy of its Python tensors) and prefaulting it.
void bind_loading(py::module_& m) {
  m.def(
      "load",
      [](const std::vector<std::tuple<std::string, at::Tensor, bool>>& tensors, const StateDict& state,
         const std::string& mode, bool strict, bool verify_checksums, bool drop_read_pages,
         const std::optional<std::tuple<int64_t, int64_t, std::vector<std::pair<std::string, int64_t>>>>& part) {
        std::vector<Entry> entries;
        for (const auto& [name, tensor, buffer] : tensors) entries.push_back({name, tensor, buffer});
        const auto proxy = proxy_of(entries);
        LoadOptions options;
        options.mode = mode_of(mode);
        options.strict = strict;
        options.verify_checksums = verify_checksums;
        options.drop_read_pages = drop_read_pages;
        if (part) {  // load() checks the plan (check_plan: a rank in [0, world_size))
          const auto& [rank, world_size, splits] = *part;
          options.parallel = ParallelPlan{rank, world_size, splits};
        }
        LoadReport report;
        {
          InterruptCheckScope interruptible(python_signals());
          py::gil_scoped_release unlocked;
          report = tensormap::load(*proxy, state, options);
        }
        return report_dict(report);
      },
      py::arg("tensors"), py::arg("state"), py::arg("mode"), py::arg("strict"), py::arg("verify_checksums"),
      py::arg("drop_read_pages"), py::arg("part") = py::none());
  m.def(
      "prefault",
      [](const std::vector<std::tuple<std::string, at::Tensor, bool>>& tensors, int threads,
         const StateDict* verify_against) {
        std::vector<Entry> entries;
        for (const auto& [name, tensor, buffer] : tensors) entries.push_back({name, tensor, buffer});
        const auto proxy = proxy_of(entries);
        InterruptCheckScope interruptible(python_signals());
        py::gil_scoped_release unlocked;
        if (verify_against) {
          tensormap::prefault(*proxy, *verify_against, {threads, true});
        } else {
          tensormap::prefault(*proxy, threads);
        }
      },
      py::arg("tensors"), py::arg("threads"), py::arg("verify_against") = nullptr);

  py::class_<Background>(m, "BackgroundPrefault")
      .def("wait",
           [](Background& b) {
             if (!b.prefault) return;
             {
               py::gil_scoped_release unlocked;
               b.prefault->wait();
             }
             b.prefault.reset();
             b.proxy.reset();
           })
      .def("done", [](const Background& b) { return !b.prefault || b.prefault->done(); });
  m.def("prefault_in_background", [](const std::vector<std::tuple<std::string, at::Tensor, bool>>& tensors) {
    std::vector<Entry> entries;
    for (const auto& [name, tensor, buffer] : tensors) entries.push_back({name, tensor, buffer});
    auto b = std::make_unique<Background>();
    b->proxy = proxy_of(entries);
    b->prefault.emplace(tensormap::prefault_in_background(*b->proxy));
    return b;
  });
}

// Saving tensors and converting checkpoints.
void bind_saving(py::module_& m) {
  py::class_<SaveHandle>(m, "BackgroundSave")
      .def(
          "wait",
          [](SaveHandle& h) {
            py::gil_scoped_release unlocked;
            h.wait();
          },
          "Blocks until the save is published or has failed; raises its Error. Once.")
      .def("done", &SaveHandle::done, "Whether the save has ended (wait() then returns at once).")
      .def_property_readonly("pid", &SaveHandle::pid, "The process writing the file; -1 once waited for.");

  m.def(
      "save",
      [](const std::vector<std::pair<std::string, at::Tensor>>& tensors, const std::string& path,
         const std::optional<std::string>& format, uint64_t alignment,
         const std::vector<std::pair<std::string, std::string>>& metadata, bool sync, bool store_ties_once,
         bool background) -> py::object {
        SaveOptions options;
        options.format = format_of(format).value_or(format_for_path(path));
        options.alignment = alignment;
        options.metadata = metadata;
        options.sync = sync;
        options.store_ties_once = store_ties_once;
        if (background) return py::cast(tensormap::save_async(tensors, path, options));  // the fork is short
        InterruptCheckScope interruptible(python_signals());
        py::gil_scoped_release unlocked;
        tensormap::save(tensors, path, options);
        return py::none();
      },
      py::arg("tensors"), py::arg("path"), py::arg("format"), py::arg("alignment"), py::arg("metadata"),
      py::arg("sync"), py::arg("store_ties_once"), py::arg("background") = false);

  m.def("distributed_file_name", &tensormap::distributed_file_name, py::arg("index_path"), py::arg("id"),
        py::arg("rank"), py::arg("world"));
  m.def(
      "publish_distributed_index",
      [](const std::string& path, const std::vector<std::pair<std::string, std::string>>& whole,
         const std::vector<std::tuple<std::string, int64_t, std::vector<int64_t>, std::vector<std::string>>>& split,
         uint64_t total_size, bool sync) {
        DistributedIndex index;
        index.whole = whole;
        for (const auto& [name, dim, shape, files] : split) index.split.push_back({name, dim, shape, files});
        index.total_size = total_size;
        py::gil_scoped_release unlocked;
        tensormap::publish_distributed_index(path, index, sync);
      },
      py::arg("path"), py::arg("whole"), py::arg("split"), py::arg("total_size"), py::arg("sync"));

  m.def(
      "convert",
      [](const std::string& in, const std::string& out, const std::optional<std::string>& format, uint64_t alignment,
         const std::optional<std::string>& dtype, uint64_t shard_size, bool sync) {
        ConvertOptions options;
        options.format = format_of(format);
        options.alignment = alignment;
        options.float_dtype = dtype_of(dtype);
        options.shard_size = shard_size;
        options.sync = sync;
        ConvertResult result;
        {
          InterruptCheckScope interruptible(python_signals());
          py::gil_scoped_release unlocked;
          result = tensormap::convert(in, out, options);
        }
        py::dict d;
        d["format"] = std::string(format_name(result.format));
        d["tensors"] = result.tensors;
        d["shards"] = result.shards;
        d["bytes"] = result.bytes;
        return d;
      },
      py::arg("src"), py::arg("dst"), py::arg("format"), py::arg("alignment"), py::arg("dtype"), py::arg("shard_size"),
      py::arg("sync"));
}

// Checking a whole checkpoint.
void bind_verifying(py::module_& m) {
  m.def(
      "verify",
      [](const std::string& path) {
        VerifyReport report;
        {
          InterruptCheckScope interruptible(python_signals());
          py::gil_scoped_release unlocked;
          report = verify_checkpoint(path);
        }
        if (!report.ok()) {
          const auto& problems = report.problems;
          std::string message = std::to_string(problems.size()) + " problem(s) in " + path + ": ";
          for (size_t i = 0; i < problems.size(); ++i) message += (i ? "; " : "") + std::string(problems[i].what());
          throw Error(problems.front().kind(), message);
        }
        py::dict d;
        d["format"] = std::string(format_name(report.format));
        d["tensors"] = report.tensors;
        d["checksums"] = report.checksums;
        return d;
      },
      py::arg("path"));
}

// Models without storage: the skeleton scope, releasing, materializing.
void bind_skeleton(py::module_& m) {
  // The skeleton scope of the calling thread, opened and closed by tensormap.skeleton().
  py::class_<Scope>(m, "SkeletonScope")
      .def(py::init([] {
        auto scope = std::make_unique<Scope>();
        scope->scope.emplace();
        return scope;
      }))
      .def("close", [](Scope& s) { s.scope.reset(); });
  m.def(
      "release", [](const at::Tensor& t) { tensormap::release(t); }, py::arg("tensor"));
  m.def(
      "release_as", [](const at::Tensor& t, std::vector<int64_t> sizes) { tensormap::release(t, sizes); },
      py::arg("tensor"), py::arg("sizes"));
  m.def(
      "is_released", [](const at::Tensor& t) { return tensormap::is_released(t); }, py::arg("tensor"));
  // materialize over the proxy of a Python model: `reset(name)` runs the Python module's
  // own rule (its reset_parameters), if it has one; `init(name, tensor)`, if
  // given, follows. Both are Python callables, run with the GIL held.
  m.def(
      "materialize",
      [](const std::vector<std::tuple<std::string, at::Tensor, bool>>& tensors, const py::function& reset,
         const std::optional<py::function>& init) {
        std::vector<Entry> entries;
        for (const auto& [name, tensor, buffer] : tensors) entries.push_back({name, tensor, buffer});
        const auto proxy = proxy_of(entries);
        TensorInitializer each;
        if (init) each = [&](const std::string& name, at::Tensor& t) { (*init)(name, t); };
        return tensormap::materialize(*proxy, each, [&](const std::string& name, torch::nn::Module&) { reset(name); });
      },
      py::arg("tensors"), py::arg("reset"), py::arg("init"));
}

// The page cache under mapped checkpoints.
void bind_page_cache(py::module_& m) {
  m.def("huge_mapped_share", [](const std::string& path) { return tensormap::huge_mapped_share(path); });
}

}  // namespace

void bind(py::module_& m) {
  bind_errors(m);
  bind_reading(m);
  bind_loading(m);
  bind_saving(m);
  bind_verifying(m);
  bind_skeleton(m);
  bind_page_cache(m);
}

}  // namespace tensormap::python

PYBIND11_MODULE(_C, m) {
  m.doc() = "tensormap's C++ core; use the tensormap package, not this module";
  tensormap::python::bind(m);
}
