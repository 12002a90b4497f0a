// Loading a torch::nn::Module from a checkpoint: the checks every load shares (loading.h),
// map and copy mode, tensor-parallel parts. Prefaulting a loaded model: prefault.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/nn/module.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "loading.h"
#include "released.h"
#include "tensormap/error.h"
#include "tensormap/interrupt.h"
#include "tensormap/load.h"
#include "tensormap/remote.h"
#include "tensormap/save.h"
#include "tensormap/skeleton.h"
#include "tensormap/state_dict.h"
#include "tensormap/tensor.h"

namespace tensormap {
namespace {

std::string shape_string(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << sizes;
  return out.str();
}

// Names are quoted: an unexpected name comes from the file, which may hold any bytes. A
// mismatch line ("name: why") names a tensor both sides have, and is shown as it is.
void append_list(std::ostringstream& out, const char* what, const std::vector<std::string>& items, bool& first,
                 bool names = true) {
  if (items.empty()) return;
  constexpr size_t kShown = 8;
  out << (first ? "" : "; ") << items.size() << " " << what << " (";
  for (size_t i = 0; i < items.size() && i < kShown; ++i) {
    out << (i ? ", " : "") << (names ? quoted_name(items[i]) : items[i]);
  }
  if (items.size() > kShown) out << ", and " << items.size() - kShown << " more";
  out << ")";
  first = false;
}

}  // namespace

namespace detail {
namespace {

// Copy mode: the tensor (or the rank's part of it) into the target's own memory, read
// with pread straight into it when the bytes are already what the target holds, so that
// no temporary is made and no mapped page is faulted in (and no SIGBUS if the file
// shrinks meanwhile).
void copy_into(at::Tensor& target, const StateDict& state, const LoadPlan::Binding& b, const BindingOptions& how) {
  const bool verify = how.verify;
  ensure_storage(target, how.huge_pages);
  const StateDict::Info info = state.info(b.name);
  const bool same_bytes = to_scalar_type(info.dtype) == target.scalar_type() && target.is_contiguous();
  const Part& p = b.part;
  if (same_bytes && p.dim >= 0) {
    state.read(b.name, p.dim, p.start, p.length, target.data_ptr());
  } else if (same_bytes && verify) {
    state.read_checked(b.name, target.data_ptr());
  } else if (same_bytes) {
    state.read(b.name, target.data_ptr());
  } else if (p.dim >= 0) {
    target.copy_(state.slice(b.name, p.dim, p.start, p.length));
  } else {
    at::Tensor raw = at::empty({static_cast<int64_t>(info.byte_length)}, at::kByte);
    if (verify) {
      state.read_checked(b.name, raw.data_ptr());
    } else {
      state.read(b.name, raw.data_ptr());
    }
    target.copy_(raw.view(*to_scalar_type(info.dtype)).view(info.shape));
  }
  state.evict(b.name);
  if (how.drop_cache) state.drop_cache(b.name);
}

}  // namespace

// Why the tensor described by `info` cannot be loaded into `target` in `mode`, or "".
// `info.shape` is what the target must have: a split tensor's part shape.
std::string mismatch(const at::Tensor& target, const StateDict::Info& info, LoadMode mode) {
  const auto file_type = to_scalar_type(info.dtype);
  if (!file_type) {
    return "dtype " + std::string(dtype_name(info.dtype)) + " in the file has no equivalent in LibTorch " TORCH_VERSION;
  }
  if (target.sizes() != at::IntArrayRef(info.shape)) {
    return "shape " + shape_string(target.sizes()) + " in the model, " + shape_string(info.shape) + " in the file";
  }
  const std::string types = std::string("dtype ") + c10::toString(target.scalar_type()) + " in the model, " +
                            std::string(dtype_name(info.dtype)) + " in the file";
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

// A fresh tensor whose pages are faulted in ahead, in one system call: page by page
// first-touch faults cost several times more, markedly so in virtual machines. With
// `huge`, one of 2 MiB or more lies in memory of its own in 2 MiB pages (allocate_huge).
at::Tensor allocate_populated(at::IntArrayRef sizes, const at::TensorOptions& options, bool huge) {
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (huge && bytes >= kHuge && options.device().is_cpu()) {
    if (void* memory = allocate_huge(bytes)) {
      return at::from_blob(
          memory, sizes, [bytes](void* p) { free_huge(p, bytes); }, options);
    }
  }
  at::Tensor t = at::empty(sizes, options);
  populate_for_write(t.data_ptr(), t.nbytes());
  return t;
}

// This rank's part of a tensor of shape `shape` under `plan`, and the part's shape put
// into `shape`; or the reason it cannot be split.
std::string plan_part(const std::optional<ParallelPlan>& plan, const std::string& name, std::vector<int64_t>& shape,
                      Part& part) {
  if (!plan) return "";
  const auto dim = plan->split_dim(name);
  if (!dim) return "";
  const auto rank = static_cast<int64_t>(shape.size());
  int64_t d = *dim < 0 ? *dim + rank : *dim;
  if (d < 0 || d >= rank) {
    return "the plan splits dimension " + std::to_string(*dim) + " of a tensor of rank " + std::to_string(rank);
  }
  const int64_t size = shape[static_cast<size_t>(d)];
  if (size % plan->world_size != 0) {
    return "dimension " + std::to_string(d) + " of size " + std::to_string(size) + " does not split into " +
           std::to_string(plan->world_size) + " equal parts";
  }
  part = {d, size / plan->world_size * plan->rank, size / plan->world_size};
  shape[static_cast<size_t>(d)] = part.length;
  return "";
}

std::string check_target(const at::Tensor& target, const std::string& name, StateDict::Info info,
                         const std::optional<ParallelPlan>& plan, LoadMode mode, Part& part) {
  const std::vector<int64_t> whole = info.shape;
  std::string why = plan_part(plan, name, info.shape, part);
  if (!why.empty()) return why;
  if (part.dim >= 0 && target.sizes() != at::IntArrayRef(info.shape)) {
    return "shape " + shape_string(target.sizes()) + " in the model, " + shape_string(info.shape) +
           " expected for rank " + std::to_string(plan->rank) + " of " + std::to_string(plan->world_size) + " (dim " +
           std::to_string(part.dim) + " of " + shape_string(whole) + " split in " + std::to_string(plan->world_size) +
           ")";
  }
  return mismatch(target, info, mode);
}

void read_ahead_exactly(const at::Tensor& view) {
  const auto [begin, end] = pages_of(view);
  if (end > begin) read_ahead(reinterpret_cast<const void*>(begin), end - begin);
}

void check_plan(const ParallelPlan& plan) {
  if (plan.world_size < 1 || plan.rank < 0 || plan.rank >= plan.world_size) {
    throw Error(ErrorKind::InvalidArgument, "parallel plan has rank " + std::to_string(plan.rank) + " of world size " +
                                                std::to_string(plan.world_size));
  }
}

void ensure_storage(at::Tensor& target, bool huge) {
  if (is_released(target)) {
    prepare_to_bind(target);
    target.set_(allocate_populated(target.sizes(), target.options(), huge));
  }
}

void store(at::Tensor& target, const at::Tensor& value, LoadMode mode) {
  if (mode == LoadMode::Map) {
    prepare_to_bind(target);
    target.set_(value);
  } else {
    ensure_storage(target);
    target.copy_(value);
  }
}

LoadPlan plan_load(const torch::nn::Module& module, const StateDict& state, const LoadOptions& options) {
  if (options.parallel) check_plan(*options.parallel);
  LoadPlan plan;
  LoadReport& report = plan.report;
  std::unordered_set<std::string> model_names;
  for (auto& [name, tensor] : named_state(module)) {
    model_names.insert(name);
    if (!state.contains(name)) {
      report.missing.push_back(name);
      plan.missing.emplace_back(name, tensor);
      continue;
    }
    Part part;
    const std::string why = check_target(tensor, name, state.info(name), options.parallel, options.mode, part);
    if (!why.empty()) {
      report.mismatched.push_back(name + ": " + why);
      continue;
    }
    plan.bindings.push_back({tensor, name, part});
  }
  for (const std::string& name : state.keys()) {
    if (!model_names.count(name)) report.unexpected.push_back(name);
  }
  if (options.strict && !report.complete()) {
    throw Error(ErrorKind::ModelMismatch,
                "the " + std::string(format_name(state.format())) +
                    " checkpoint does not match the model, nothing was loaded: " + report.summary());
  }
  return plan;
}

void load_binding(LoadPlan::Binding& b, const StateDict& state, const BindingOptions& options) {
  detail::check_interrupt();  // between tensors (interrupt.h)
  if (options.mode == LoadMode::Copy) {
    copy_into(b.target, state, b, options);
  } else {
    // The tensor, or a rank's part of it: a zero-copy view (a part that is not one range
    // of the file comes as a tensor of its own, read row by row).
    at::Tensor value = b.part.dim >= 0 ? state.slice(b.name, b.part.dim, b.part.start, b.part.length, options.mapping)
                                       : state.at(b.name, options.mapping);
    // Read ahead now, exactly. Left to page faults, the kernel's read-around (up to
    // read_ahead_kb, 8 MiB on some disks) would pull in the neighbouring ranks' parts too.
    if (options.read_ahead) read_ahead_exactly(value);
    store(b.target, value, LoadMode::Map);
  }
}

std::vector<bool> cold_tensors(const std::vector<LoadPlan::Binding>& bindings, const StateDict& state,
                               const LoadOptions& options) {
  std::vector<bool> cold(bindings.size(), false);
  if (options.mode != LoadMode::Copy || !options.drop_read_pages) return cold;
  // Measured for all before any is read: the kernel's read-ahead for one tensor brings in
  // the start of the next, which is no reason to keep it.
  for (size_t i = 0; i < bindings.size(); ++i) cold[i] = state.cached_fraction(bindings[i].name) < 0.5;
  return cold;
}

// Where the checkpoint stores `b`'s tensor as an alias of a tensor already loaded whole
// into a model tensor of the same dtype and shape (a tied weight), that model tensor:
// `b` is bound to it rather than read again. Nothing otherwise.
const at::Tensor* tied_target(const LoadPlan::Binding& b, const StateDict& state,
                              const std::vector<LoadPlan::Binding>& bindings,
                              const std::unordered_map<std::string, size_t>& whole) {
  if (b.part.dim >= 0) return nullptr;
  const auto target = state.checkpoint().alias_of(b.name);
  if (!target) return nullptr;
  const auto found = whole.find(*target);
  if (found == whole.end()) return nullptr;
  const at::Tensor& t = bindings[found->second].target;
  if (t.scalar_type() != b.target.scalar_type() || t.sizes() != b.target.sizes()) return nullptr;
  return &t;
}

// What a load that failed at binding `failed` says of the model: the tensors before it
// hold the checkpoint's bytes, that one and those after do not (that one may be written in
// part, as a copy stops where its read failed).
std::string unloaded(const std::vector<LoadPlan::Binding>& bindings, size_t failed) {
  std::ostringstream out;
  out << "; the load stopped there: " << failed << " of " << bindings.size() << " tensors loaded, ";
  std::vector<std::string> rest;
  for (size_t i = failed; i < bindings.size(); ++i) rest.push_back(bindings[i].name);
  bool first = true;
  append_list(out, "not loaded", rest, first);
  out << ", " << quoted_name(bindings[failed].name) << " perhaps in part";
  return out.str();
}

// Copy loads from a URL: a tensor's read mostly waits on the network, and a read of one
// tensor at a time left the connections idle at every tensor's end (and a small tensor
// used one connection of eight). So several tensors are read at once, each on a thread
// of its own, their chunks sharing the fetcher's connections. Each read goes straight
// into its tensor, allocated (by the caller) just before its read is queued, so no byte
// is held twice; `window` bounds the bytes queued ahead of what has landed.
constexpr unsigned kRemoteReaders = 8;
constexpr uint64_t kRemoteWindow = uint64_t{256} << 20;

class ConcurrentReads {
 public:
  ConcurrentReads(unsigned threads, uint64_t window) : window_(window) {
    for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { work(); });
  }

  // Stops taking reads and waits for those running; each stops at its next chunk.
  ~ConcurrentReads() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      queue_.clear();
    }
    changed_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // Queues `read` of `bytes` once those in flight leave room for it (or none are in
  // flight); false, with nothing queued, once a read has failed (finish() says why).
  // Runs the caller's interrupt check while it waits.
  bool add(uint64_t bytes, std::function<void()> read) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!failed_ && in_flight_ > 0 && in_flight_ + bytes > window_) wait(lock);
    if (failed_) return false;
    in_flight_ += bytes;
    queue_.push_back({bytes, std::move(read)});
    changed_.notify_all();
    return true;
  }

  // Waits for every queued read; rethrows the first failure.
  void finish() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!queue_.empty() || running_ > 0) wait(lock);
    if (failed_) std::rethrow_exception(error_);
  }

 private:
  struct Read {
    uint64_t bytes;
    std::function<void()> run;
  };

  void wait(std::unique_lock<std::mutex>& lock) {
    // On an interrupt, the readers' checks throw: their reads stop.
    wait_interruptibly(lock, changed_, [this] { stopping_ = true; });
  }

  void work() {
    // Each reader's interrupt check ends its read once the load stops (a failure
    // elsewhere, or the caller's interrupt): the fetcher runs it while it waits.
    InterruptCheckScope scope([this] {
      if (stopping_.load()) throw Error(ErrorKind::Io, "the load stopped");  // never shown: the cause is
    });
    at::NoGradGuard no_grad;  // a parameter is written in place
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      changed_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;
      Read read = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
      lock.unlock();
      std::exception_ptr error;
      try {
        read.run();
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      --running_;
      in_flight_ -= read.bytes;
      if (error) {
        if (!failed_) error_ = error;  // the cause: the reads it stops fail as Interrupted
        failed_ = true;
        stopping_ = true;
        queue_.clear();
      }
      changed_.notify_all();
    }
  }

  const uint64_t window_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Read> queue_;
  std::vector<std::thread> threads_;
  std::atomic<bool> stopping_{false};
  uint64_t in_flight_ = 0;
  size_t running_ = 0;
  bool failed_ = false;
  std::exception_ptr error_;
};

LoadReport apply_load(LoadPlan plan, const StateDict& state, const LoadOptions& options) {
  LoadReport& report = plan.report;
  at::NoGradGuard no_grad;
  // A rank maps each of its tensors (or parts) in a mapping of its own: in the shared
  // mapping of the whole file, a fault at a part's edge maps the whole page-cache folio
  // around it, the neighbouring ranks' bytes included (up to 2 MiB an edge).
  const ViewMapping mapping =
      options.parallel && own_mappings_fit(plan.bindings.size()) ? ViewMapping::Own : ViewMapping::File;
  const std::vector<bool> cold = cold_tensors(plan.bindings, state, options);
  std::unordered_map<std::string, size_t> whole;  // bindings of whole tensors, by name
  std::optional<ConcurrentReads> reads;
  if (options.mode == LoadMode::Copy && is_url(state.checkpoint().path())) reads.emplace(kRemoteReaders, kRemoteWindow);
  std::vector<char> done(plan.bindings.size(), 0);  // written by the readers, read once they stop
  const auto stopped = [&](const Error& e) {
    reads.reset();  // every reader has stopped: nothing writes into the model now
    const auto first = std::find(done.begin(), done.end(), 0);
    return Error(e.kind(), std::string(e.what()) + unloaded(plan.bindings, static_cast<size_t>(first - done.begin())));
  };
  try {
    for (size_t i = 0; i < plan.bindings.size(); ++i) {
      LoadPlan::Binding& b = plan.bindings[i];
      if (const at::Tensor* tied = tied_target(b, state, plan.bindings, whole)) {
        // The same storage: tied again, nothing read (already so if one tensor has both names).
        if (tied->unsafeGetTensorImpl() != b.target.unsafeGetTensorImpl()) store(b.target, *tied, LoadMode::Map);
        done[i] = 1;
        continue;
      }
      // A rank uses everything it loads, so it reads it all ahead.
      BindingOptions how;
      how.mode = options.mode;
      how.mapping = mapping;
      how.read_ahead = options.parallel.has_value();
      how.drop_cache = cold[i];
      how.verify = options.verify_checksums;
      how.huge_pages = options.huge_pages;
      if (b.part.dim < 0) whole.emplace(b.name, i);
      if (!reads) {
        load_binding(b, state, how);
        done[i] = 1;
        continue;
      }
      detail::check_interrupt();
      ensure_storage(b.target, how.huge_pages);  // here: a parameter is rebound on this thread only
      const auto bytes = static_cast<uint64_t>(b.target.nbytes());
      if (!reads->add(bytes, [&b, &state, &done, how, i] {
            load_binding(b, state, how);
            done[i] = 1;
          })) {
        break;
      }
    }
    if (reads) reads->finish();
  } catch (const Error& e) {
    throw stopped(e);
  } catch (...) {
    reads.reset();
    throw;
  }
  for (const LoadPlan::Binding& b : plan.bindings) report.loaded.push_back(b.name);
  const std::string& path = state.checkpoint().path();
  for (const auto& [name, tensor] : plan.missing) mark_missing(tensor, name, path);
  return report;
}

LoadMode resolved_mode(LoadMode mode, const StateDict& state) {
  const std::string& path = state.checkpoint().path();
  if (is_url(path)) {  // nothing to map: the bytes are on another machine
    if (mode == LoadMode::Map) {
      throw Error(ErrorKind::InvalidArgument,
                  path + ": map mode has no meaning for a URL; load it in copy mode (auto mode, the default, does)");
    }
    return LoadMode::Copy;
  }
  if (mode != LoadMode::Auto) return mode;
  return fault_prone_filesystem(path).empty() ? LoadMode::Map : LoadMode::Copy;
}

}  // namespace detail

bool matches_pattern(std::string_view pattern, std::string_view name) {
  // Greedy glob with backtracking to the last '*': linear in practice, never recursive.
  size_t p = 0, n = 0, star = std::string_view::npos, mark = 0;
  while (n < name.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      mark = n;
    } else if (p < pattern.size() && pattern[p] == name[n]) {
      ++p;
      ++n;
    } else if (star != std::string_view::npos) {
      p = star + 1;
      n = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

std::optional<int64_t> ParallelPlan::split_dim(std::string_view name) const {
  for (const auto& [pattern, dim] : splits) {
    if (matches_pattern(pattern, name)) return dim;
  }
  return std::nullopt;
}

std::string LoadReport::summary() const {
  std::ostringstream out;
  bool first = true;
  append_list(out, "missing from the file", missing, first);
  append_list(out, "unexpected in the file", unexpected, first);
  append_list(out, "mismatched", mismatched, first, /*names=*/false);
  if (first) out << loaded.size() << " tensors loaded, no problems";
  return out.str();
}

LoadReport load(torch::nn::Module& module, const StateDict& state, const LoadOptions& options) {
  LoadOptions resolved = options;
  resolved.mode = detail::resolved_mode(options.mode, state);
  return detail::apply_load(detail::plan_load(module, state, resolved), state, resolved);
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

}  // namespace tensormap
