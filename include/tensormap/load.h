// Loading a torch::nn module from a checkpoint: map mode (zero-copy) or copy mode, whole
// or as one rank's part of a tensor-parallel model. (Over c10d: distributed.h.)
//
// Thread-safety: none of these functions may run concurrently on the same module.
#pragma once

#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tensormap/export.h"
#include "tensormap/file.h"
#include "tensormap/state_dict.h"

namespace tensormap {

enum class LoadMode {
  // Zero-copy: each tensor's storage is the file's private mapping. Pages are read when
  // touched; a write (an optimizer step) copies only the pages it touches and never
  // reaches the file. Dtypes must match exactly.
  Map,
  // Owned memory, tensor by tensor; the mapped pages of each tensor are given back after
  // its copy. Converts dtypes (BF16 in the file into an F32 model, say). Into a module
  // that still has storage, copies in place.
  Copy,
  // Map where a mapping is safe, Copy where the file lies on a filesystem on which a
  // mapped page can fault with SIGBUS or stall when the server does (NFS, SMB/CIFS, FUSE,
  // 9p, Ceph, AFS, Lustre and the like: fault_prone_filesystem() in file.h, from statfs),
  // and where the checkpoint is at a URL (tensormap/remote.h), which cannot be mapped.
  // The default.
  Auto,
};

// Tensor parallelism: how a model is split among `world_size` ranks. A parameter whose
// name matches a pattern of `splits` is split along that dimension into world_size equal
// parts, and rank `rank` keeps part `rank`; other parameters are replicated (loaded
// whole). In patterns, '*' matches any run of characters (dots included); the first
// matching pattern wins. The model given to load() is the rank's own model, built with
// the split shapes (as Megatron-style layers are): a planned tensor of shape [8192, 4096]
// split along dim 0 among 4 ranks loads into a [2048, 4096] parameter.
struct TENSORMAP_EXPORT ParallelPlan {
  int64_t rank = 0;
  int64_t world_size = 1;
  std::vector<std::pair<std::string, int64_t>> splits;

  // The split dimension of the named tensor, or nothing if it is replicated.
  std::optional<int64_t> split_dim(std::string_view name) const;
};

// True if `name` matches `pattern`, where '*' matches any run of characters.
TENSORMAP_EXPORT bool matches_pattern(std::string_view pattern, std::string_view name);

struct LoadOptions {
  // Auto: map a local file, copy from a network filesystem or a URL.
  LoadMode mode = LoadMode::Auto;
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
  // Copy mode: the pages a load reads from the disk are dropped from the page cache after
  // each tensor's copy (POSIX_FADV_DONTNEED), so that a cold load leaves one copy of the
  // weights in memory, not the owned copy plus the cached file. A tensor whose pages were
  // mostly cached before the load (a warm file, another process's map-mode view) keeps
  // them. false keeps everything read in the page cache. (load_distributed with a source
  // rank, which reads every rank's part, leaves the page cache as it is.)
  bool drop_read_pages = true;
  // Copy mode: each whole tensor of a tensormap file is checked against its XXH3-64 as
  // it is read (File::read_checked); a corrupt one stops the load with
  // Error(ChecksumMismatch) naming the file and the tensor, the tensors before it loaded.
  // A rank's part of a split tensor, and safetensors and torch.save files (no checksums),
  // are read unchecked. On by default: a tensor of 8 MiB or more is hashed on a second
  // thread as its pieces land, a smaller one in 256 KiB pieces while they are in cache,
  // and a 1 GiB load cost 1.03x (warm) and 1.04x (cold) the unchecked time, 9
  // interleaved rounds (bench/results/COPY-MODES-debian12.md). false skips the check.
  // Map mode reads nothing at load time: prefault(module, state, {.verify = true}) checks.
  bool verify_checksums = true;
  // Copy mode: a parameter without storage (a skeleton's) gets fresh memory of its own,
  // 2 MiB-aligned and advised MADV_HUGEPAGE where it is 2 MiB or more (allocate_huge,
  // page_cache.h), instead of the CPU allocator's 4 KiB pages; the memory is the
  // parameter's own either way (1x). Off by default: on the machines measured (a 2-core
  // VM, THP "madvise" with defrag "madvise"), 2 MiB pages made 1 GiB loads slower, not
  // faster (bench/results/COPY-MODES-debian12.md): the kernel compacts memory to find
  // each huge page in the fault path. Worth trying where huge pages come cheap.
  bool huge_pages = false;
};

struct TENSORMAP_EXPORT LoadReport {
  std::vector<std::string> loaded;      // names bound or copied
  std::vector<std::string> missing;     // in the model, not in the file
  std::vector<std::string> unexpected;  // in the file, not in the model
  std::vector<std::string> mismatched;  // one line each: name, what differs
  bool complete() const { return missing.empty() && unexpected.empty() && mismatched.empty(); }
  std::string summary() const;  // one line listing every problem
};

// Binds (map mode) or copies (copy mode) every parameter and buffer of `module`, by its
// dotted name (as named_parameters and named_buffers spell it), to the tensor of that
// name in the checkpoint: a StateDict, a File, or the path of any checkpoint
// Checkpoint::open reads (tensormap, safetensors, a sharded index, a torch.save archive),
// recognised by its content.
TENSORMAP_EXPORT LoadReport load(torch::nn::Module& module, const StateDict& state, const LoadOptions& options = {});
TENSORMAP_EXPORT LoadReport load(torch::nn::Module& module, const File& file, const LoadOptions& options = {});
TENSORMAP_EXPORT LoadReport load(torch::nn::Module& module, const std::string& path, const LoadOptions& options = {});

// Faults in now every page of every parameter and buffer of `module` (after a map-mode
// load: the file's pages), with MADV_POPULATE_READ, split among `threads` threads (0:
// LibTorch's intra-op thread count). A full touch at once instead of one 4 KiB fault at a
// time on first use. Where the kernel lacks MADV_POPULATE_READ (before 5.14), reads one
// byte per page instead. Does not write: map-mode pages stay shared with the page cache.
// Throws Error(Truncated) naming the tensor whose pages lie past the end of a file that
// shrank since it was mapped (where a touch would kill the process with SIGBUS), Error(Io)
// if the kernel cannot populate them.
TENSORMAP_EXPORT void prefault(const torch::nn::Module& module, int threads = 0);

struct PrefaultOptions {
  int threads = 0;  // as for prefault() above
  // Check each tensor against `state`'s XXH3-64 while faulting it in: the hash reads every
  // byte, so it is the fault-in, on the same threads. Tensors of a file without checksums
  // (safetensors, torch.save), rank parts and tensors whose bytes differ in size from the
  // checkpoint's are faulted in unchecked. A mismatch is Error(ChecksumMismatch) naming
  // the tensor: the file is corrupt, or the tensor was written since it was loaded (call
  // it right after the load, before training changes the weights).
  bool verify = false;
};

// prefault() of a model loaded from `state`, with the options above: map mode's
// counterpart of LoadOptions::verify_checksums.
//
//   auto state = tensormap::StateDict::open("model.tmap");
//   tensormap::load(*model, state);
//   tensormap::prefault(*model, state, {.verify = true});
TENSORMAP_EXPORT void prefault(const torch::nn::Module& module, const StateDict& state, const PrefaultOptions& options);

// The same full prefault on one thread of its own, while the caller goes on: started just
// after a map-mode load, it reads the weights in ahead of a first forward pass, so that
// the pass mostly finds its pages in (in the order named_parameters and named_buffers list
// them, which is the order most models use them). The tensors' storages, and with them
// their mappings, stay alive until the thread ends, whatever happens to the module.
//
//   auto model = tensormap::build_skeleton([] { return Net(); });
//   tensormap::load(*model, "model.tmap");
//   auto background = tensormap::prefault_in_background(*model);
//   auto out = model->forward(input);  // the first output, while pages come in
//
// The object stops the thread (at the next 4 MiB) and waits for it when destroyed; wait()
// waits for the whole prefault and throws what prefault() would (Error(Truncated) for a
// file that shrank). Neither is needed for correctness: a page not yet in is faulted in
// by whatever touches it first.
class TENSORMAP_EXPORT BackgroundPrefault {
 public:
  struct State;
  explicit BackgroundPrefault(std::unique_ptr<State> state);
  BackgroundPrefault(BackgroundPrefault&&) noexcept;
  BackgroundPrefault& operator=(BackgroundPrefault&&) noexcept;
  ~BackgroundPrefault();
  // Waits until every page is in; throws the thread's error, if any. Afterwards the object
  // is empty (done() is true).
  void wait();
  // Whether the thread has finished (or was never started).
  bool done() const;

 private:
  void stop_and_join() noexcept;
  std::unique_ptr<State> state_;
};
TENSORMAP_EXPORT BackgroundPrefault prefault_in_background(const torch::nn::Module& module);

}  // namespace tensormap
