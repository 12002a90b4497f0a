// Internal to the LibTorch layer: the checks and helpers that load() and
// load_distributed() share, so that both accept and refuse exactly the same models.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "tensormap/module.h"
#include "tensormap/page_cache.h"
#include "tensormap/state_dict.h"
#include "tensormap/tensor.h"

namespace tensormap::detail {

// The part of a tensor one rank loads: elements [start, start + length) along dim.
struct Part {
  int64_t dim = -1;  // -1: the whole tensor
  int64_t start = 0;
  int64_t length = 0;
};

// Why the tensor described by `info` cannot be loaded into `target` in `mode`, or "".
// `info.shape` is what the target must have: a split tensor's part shape.
std::string mismatch(const at::Tensor& target, const StateDict::Info& info, LoadMode mode);

// This rank's part of a tensor of shape `shape` under `plan`, with the part's shape put
// into `shape`; or the reason it cannot be split ("" if it can, or is not split).
std::string plan_part(const std::optional<ParallelPlan>& plan, const std::string& name, std::vector<int64_t>& shape,
                      Part& part);

// Why `info` (the whole tensor in the checkpoint) cannot be loaded into `target` under
// `plan` in `mode`, or "" with `part` set to what this rank takes.
std::string check_target(const at::Tensor& target, const std::string& name, StateDict::Info info,
                         const std::optional<ParallelPlan>& plan, LoadMode mode, Part& part);

// The addresses of a tensor's bytes, from the start of the page holding the first.
struct PageSpan {
  uintptr_t begin, end;
};
inline PageSpan pages_of(const at::Tensor& t) {
  const auto data = reinterpret_cast<uintptr_t>(t.data_ptr());
  const auto page = static_cast<uintptr_t>(page_size());
  return {data & ~(page - 1), data + t.nbytes()};
}

// MADV_WILLNEED over the pages of a tensor's data: reads a mapped part of a file ahead,
// exactly its pages. Advisory.
void read_ahead_exactly(const at::Tensor& view);

// What load() will do, decided before anything is bound: the report of every problem,
// and one binding per tensor that can be loaded.
struct LoadPlan {
  struct Binding {
    at::Tensor target;
    std::string name;
    Part part;
  };
  LoadReport report;
  std::vector<Binding> bindings;
  std::vector<std::pair<std::string, at::Tensor>> missing;  // report.missing, with the tensors
};

// Checks `module` against `state` as load() does, binding nothing. Throws
// Error(ModelMismatch) listing every problem when options.strict and any is found.
LoadPlan plan_load(const torch::nn::Module& module, const StateDict& state, const LoadOptions& options);

// Carries out a plan: binds (map) or copies (copy) each tensor, and returns the report.
LoadReport apply_load(LoadPlan plan, const StateDict& state, const LoadOptions& options);

// How load_binding reads one tensor.
struct BindingOptions {
  LoadMode mode = LoadMode::Copy;  // Copy or Map, never Auto (resolved_mode)
  // Map mode: where zero-copy views live (StateDict::at), and whether a view is read
  // ahead exactly (MADV_WILLNEED) first.
  ViewMapping mapping = ViewMapping::File;
  bool read_ahead = false;
  // Copy mode: drop the tensor's pages from the page cache after the copy, and check a
  // whole tensor's checksum as it is read.
  bool drop_cache = false;
  bool verify = false;
  // Copy mode: a released target gets fresh memory in 2 MiB pages (LoadOptions::huge_pages).
  bool huge_pages = false;
};

// Loads one binding: in copy mode, a pread straight into the target's own memory; in map
// mode, the tensor or part as StateDict::at or slice gives it, bound to the target.
void load_binding(LoadPlan::Binding& b, const StateDict& state, const BindingOptions& options);

// For each binding, whether a copy-mode load drops its pages from the page cache after
// copying it (LoadOptions::drop_read_pages): those mostly not cached before the load.
std::vector<bool> cold_tensors(const std::vector<LoadPlan::Binding>& bindings, const StateDict& state,
                               const LoadOptions& options);

// `mode`, with Auto resolved for the filesystem `state` lies on (see LoadMode::Auto).
LoadMode resolved_mode(LoadMode mode, const StateDict& state);

// Makes a released target an ordinary tensor with fresh, faulted-in memory; keeps an
// allocated one as it is.
void ensure_storage(at::Tensor& target, bool huge = false);

// Puts `value` into `target`: binds it in map mode, copies it (allocating a released
// target first) in copy mode.
void store(at::Tensor& target, const at::Tensor& value, LoadMode mode);

// Throws Error(InvalidArgument) unless 0 <= rank < world_size.
void check_plan(const ParallelPlan& plan);

// A fresh tensor, its pages faulted in ahead in one system call.
at::Tensor allocate_populated(at::IntArrayRef sizes, const at::TensorOptions& options, bool huge = false);

}  // namespace tensormap::detail
