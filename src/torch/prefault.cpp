// Prefaulting a loaded model's pages, at once on many threads (prefault) or on one
// thread in the background (prefault_in_background): see tensormap/load.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <thread>

#include <xxhash.h>

#include "loading.h"
#include "released.h"
#include "tensormap/error.h"
#include "tensormap/load.h"
#include "tensormap/page_cache.h"
#include "tensormap/state_dict.h"
#include "tensormap/tensor.h"

namespace tensormap {

using detail::pages_of;
using detail::PageSpan;

namespace {

// A range of pages to fault in, of the tensor `names[tensor]`.
struct PrefaultPiece {
  uintptr_t begin, end;
  size_t tensor;
};

// Every CPU parameter and buffer of `module` with storage, as page ranges in the order
// named_parameters and named_buffers list them; their names into `names`, their tensors
// into `keep` (when given), and the total bytes into `total`.
std::vector<PrefaultPiece> prefault_ranges(const torch::nn::Module& module, std::vector<std::string>& names,
                                           std::vector<at::Tensor>* keep, uint64_t& total) {
  std::vector<PrefaultPiece> ranges;
  total = 0;
  for (const auto& [name, t] : named_state(module)) {
    if (is_released(t) || t.nbytes() == 0 || !t.device().is_cpu()) continue;
    const PageSpan span = pages_of(t);
    ranges.push_back({span.begin, span.end, names.size()});
    names.push_back(name);
    if (keep) keep->push_back(t);
    total += span.end - span.begin;
  }
  return ranges;
}

// Runs `step(item, error)` over each share of `work` on a thread of its own (the first on
// the calling thread); a share stops at its first error, and the first error found is
// thrown once every thread is done.
template <typename Item, typename Step>
void run_shares(const std::vector<std::vector<Item>>& work, Step step) {
  std::vector<std::optional<Error>> errors(work.size());
  auto run = [&](size_t w) {
    for (const Item& item : work[w]) {
      step(item, errors[w]);
      if (errors[w]) return;
    }
  };
  std::vector<std::thread> pool;
  for (size_t w = 1; w < work.size(); ++w) pool.emplace_back(run, w);
  if (!work.empty()) run(0);
  for (auto& t : pool) t.join();
  for (const auto& e : errors) {
    if (e) throw *e;
  }
}

// Faults in one range for reading; the error, if any, into `error`.
void fault_in(const PrefaultPiece& r, const std::vector<std::string>& names, std::optional<Error>& error) {
  const int err = populate_for_read(reinterpret_cast<const void*>(r.begin), r.end - r.begin);
  if (err == 0) return;
  if (err == EFAULT) {  // a touch would have raised SIGBUS: the file shrank under the mapping
    error = Error(ErrorKind::Truncated, "prefault: the pages of tensor " + quoted_name(names[r.tensor]) +
                                            " lie past the end of its file, which shrank since it was mapped");
    return;
  }
  if (err != EINVAL) {  // EINVAL: a kernel before 5.14; touch instead
    error = Error(ErrorKind::Io, "prefault: cannot populate the pages of tensor " + quoted_name(names[r.tensor]) +
                                     ": " + std::strerror(err));
    return;
  }
  volatile unsigned char sink = 0;
  for (uintptr_t p = r.begin; p < r.end; p += static_cast<uintptr_t>(page_size()))
    sink = sink + *reinterpret_cast<const unsigned char*>(p);
}

}  // namespace

void prefault(const torch::nn::Module& module, int threads) {
  const uintptr_t page = static_cast<uintptr_t>(page_size());
  std::vector<std::string> names;
  uint64_t total = 0;
  const std::vector<PrefaultPiece> ranges = prefault_ranges(module, names, nullptr, total);
  if (threads <= 0) threads = std::max(1, at::get_num_threads());
  // Cut the ranges into `threads` shares of about equal bytes, on page boundaries.
  const uint64_t share = (total / static_cast<uint64_t>(threads) + page) & ~(page - 1);
  std::vector<std::vector<PrefaultPiece>> work(static_cast<size_t>(threads));
  size_t worker = 0;
  uint64_t filled = 0;
  for (PrefaultPiece r : ranges) {
    while (r.begin < r.end) {
      const uint64_t room = share - filled;
      const uintptr_t cut = std::min<uintptr_t>(r.end, r.begin + room);
      work[worker].push_back({r.begin, cut, r.tensor});
      filled += cut - r.begin;
      r.begin = cut;
      if (filled >= share && worker + 1 < work.size()) {
        ++worker;
        filled = 0;
      }
    }
  }
  run_shares(work, [&](const PrefaultPiece& r, std::optional<Error>& error) { fault_in(r, names, error); });
}

namespace {

// One tensor for a verified prefault: its bytes, and the checksum they must hash to (none:
// faulted in unchecked).
struct VerifyJob {
  const unsigned char* data;
  uint64_t size;
  std::optional<uint64_t> checksum;
  std::string name;
};

void run_job(const VerifyJob& job, const std::string& path, std::optional<Error>& error) {
  const uintptr_t page = static_cast<uintptr_t>(page_size());
  const auto begin = reinterpret_cast<uintptr_t>(job.data) & ~(page - 1);
  const auto end = reinterpret_cast<uintptr_t>(job.data) + job.size;
  fault_in({begin, end, 0}, {job.name}, error);  // Truncated, not SIGBUS, for a file that shrank
  if (error || !job.checksum) return;
  const uint64_t computed = XXH3_64bits(job.data, static_cast<size_t>(job.size));
  if (computed != *job.checksum) {
    char hex[2][19];
    std::snprintf(hex[0], sizeof hex[0], "0x%016llx", static_cast<unsigned long long>(computed));
    std::snprintf(hex[1], sizeof hex[1], "0x%016llx", static_cast<unsigned long long>(*job.checksum));
    error = Error(ErrorKind::ChecksumMismatch,
                  "prefault: tensor " + quoted_name(job.name) + " hashes to " + hex[0] + " but " + path + " records " +
                      hex[1] + ": the file is corrupt, or the tensor was written since it was loaded");
  }
}

}  // namespace

void prefault(const torch::nn::Module& module, const StateDict& state, const PrefaultOptions& options) {
  if (!options.verify) {
    prefault(module, options.threads);
    return;
  }
  std::vector<VerifyJob> jobs;
  std::vector<at::Tensor> keep;
  for (const auto& [name, t] : named_state(module)) {
    if (is_released(t) || t.nbytes() == 0 || !t.device().is_cpu()) continue;
    VerifyJob job{static_cast<const unsigned char*>(t.data_ptr()), t.nbytes(), std::nullopt, name};
    if (state.contains(name) && t.is_contiguous()) {
      const TensorPlacement p = state.checkpoint().placement(name);
      if (p.file && p.entry && p.file->has_checksums() && p.entry->byte_length == t.nbytes()) {
        job.checksum = p.entry->checksum;
      }
    }
    jobs.push_back(std::move(job));
    keep.push_back(t);
  }
  // The largest first, each to the thread with the fewest bytes so far.
  std::sort(jobs.begin(), jobs.end(), [](const VerifyJob& a, const VerifyJob& b) { return a.size > b.size; });
  const size_t threads =
      static_cast<size_t>(options.threads > 0 ? options.threads : std::max(1, at::get_num_threads()));
  std::vector<std::vector<const VerifyJob*>> work(std::min(threads, std::max<size_t>(jobs.size(), 1)));
  std::vector<uint64_t> assigned(work.size(), 0);
  for (const VerifyJob& job : jobs) {
    const size_t w = static_cast<size_t>(std::min_element(assigned.begin(), assigned.end()) - assigned.begin());
    work[w].push_back(&job);
    assigned[w] += job.size;
  }
  const std::string& path = state.checkpoint().path();
  run_shares(work, [&](const VerifyJob* job, std::optional<Error>& error) { run_job(*job, path, error); });
}

struct BackgroundPrefault::State {
  std::vector<std::string> names;
  std::vector<at::Tensor> keep;  // the storages stay alive, and mapped, until the thread ends
  std::vector<PrefaultPiece> ranges;
  std::atomic<bool> stop{false};
  std::atomic<bool> finished{false};
  std::optional<Error> error;  // written by the thread before `finished`
  std::thread thread;
};

BackgroundPrefault prefault_in_background(const torch::nn::Module& module) {
  auto state = std::make_unique<BackgroundPrefault::State>();
  uint64_t total = 0;
  state->ranges = prefault_ranges(module, state->names, &state->keep, total);
  BackgroundPrefault::State* s = state.get();
  s->thread = std::thread([s] {
    // In pieces of 4 MiB, in the order the tensors are listed, so that a forward pass
    // running meanwhile finds the next layers' pages in, and a stop is quick.
    constexpr uintptr_t kPiece = uintptr_t{4} << 20;
    for (const PrefaultPiece& r : s->ranges) {
      for (uintptr_t at = r.begin; at < r.end && !s->stop.load(std::memory_order_relaxed); at += kPiece) {
        fault_in({at, std::min(r.end, at + kPiece), r.tensor}, s->names, s->error);
        if (s->error) break;
      }
      if (s->error || s->stop.load(std::memory_order_relaxed)) break;
    }
    s->finished.store(true, std::memory_order_release);
  });
  return BackgroundPrefault(std::move(state));
}

BackgroundPrefault::BackgroundPrefault(std::unique_ptr<State> state) : state_(std::move(state)) {}
BackgroundPrefault::BackgroundPrefault(BackgroundPrefault&&) noexcept = default;

BackgroundPrefault& BackgroundPrefault::operator=(BackgroundPrefault&& other) noexcept {
  if (this != &other) {
    stop_and_join();
    state_ = std::move(other.state_);
  }
  return *this;
}

BackgroundPrefault::~BackgroundPrefault() { stop_and_join(); }

void BackgroundPrefault::stop_and_join() noexcept {
  if (!state_) return;
  state_->stop.store(true, std::memory_order_relaxed);
  if (state_->thread.joinable()) state_->thread.join();
  state_.reset();
}

bool BackgroundPrefault::done() const { return !state_ || state_->finished.load(std::memory_order_acquire); }

void BackgroundPrefault::wait() {
  if (!state_) return;
  if (state_->thread.joinable()) state_->thread.join();
  const std::optional<Error> error = state_->error;
  state_.reset();  // the storages are released here: the module holds its own
  if (error) throw *error;
}

}  // namespace tensormap
