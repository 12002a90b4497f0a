// Loading a tensor-parallel model over torch.distributed's own engine (c10d).
//
// Every rank of a c10d process group calls load_distributed with its own rank's model,
// built with split shapes, and the same ParallelPlan splits. Two ways to reach the checkpoint:
//
//   - source_rank = -1: every rank reads its own parts from storage they all reach
//     (a shared file system). Nothing crosses the network; each rank maps the file and
//     touches only its share.
//   - source_rank = r: only rank r opens the checkpoint; `path` is ignored elsewhere.
//     Rank r sends each rank its parts of the split tensors (point-to-point) and
//     broadcasts the replicated ones. The other ranks hold only their own parts (owned
//     memory); rank r keeps its own parts as in LoadOptions::mode and holds at most one
//     other rank's part of one tensor at a time.
//
// Collective: all ranks must call it together with models of the same structure. Errors
// are agreed on before any weight moves: if any rank finds a problem (no file, a model
// that does not match), every rank throws the same tensormap::Error, prefixed with the
// rank that found it, and nothing is loaded; no rank is left waiting.
#pragma once

#include <torch/nn/module.h>
#include <torch/version.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tensormap/export.h"
#include "tensormap/load.h"
#include "tensormap/save.h"

// LibTorch 2.x split c10d in two: a ProcessGroup dispatches to Backends, and
// ProcessGroupGloo became a Backend. 1.13's ProcessGroupGloo is itself a ProcessGroup.
#if TORCH_VERSION_MAJOR >= 2
#define TENSORMAP_C10D_HAS_BACKEND 1
#include <torch/csrc/distributed/c10d/Backend.hpp>
#else
#define TENSORMAP_C10D_HAS_BACKEND 0
#endif

namespace tensormap {

struct DistributedLoadOptions {
  // mode and strict as for load(); `parallel` is ignored: rank and world size come from
  // the group, splits from the argument.
  LoadOptions load;
  // -1: every rank reads the checkpoint itself. Otherwise the one rank that reads it.
  int source_rank = -1;
};

// Loads this rank's part of `module` from the checkpoint at `path` (any format
// StateDict::open reads). `splits` is ParallelPlan::splits. Returns this rank's report.
// `group`: LibTorch 1.13, a c10d::ProcessGroupGloo (or any ProcessGroup); LibTorch 2.x, a
// c10d::ProcessGroup with a CPU backend (what torch.distributed's default group is).
TENSORMAP_EXPORT LoadReport load_distributed(torch::nn::Module& module, const std::string& path,
                                             c10d::ProcessGroup& group,
                                             const std::vector<std::pair<std::string, int64_t>>& splits,
                                             const DistributedLoadOptions& options = {});

#if TENSORMAP_C10D_HAS_BACKEND
// LibTorch 2.x: the same over a backend used on its own, such as a c10d::ProcessGroupGloo
// made directly from a store.
TENSORMAP_EXPORT LoadReport load_distributed(torch::nn::Module& module, const std::string& path, c10d::Backend& group,
                                             const std::vector<std::pair<std::string, int64_t>>& splits,
                                             const DistributedLoadOptions& options = {});
#endif

// Saving a tensor-parallel model from every rank of a c10d group (spec/FORMAT.md,
// section 16). Every rank calls save_distributed with its own model, built with split
// shapes, and the same `splits` (ParallelPlan::splits). Each rank writes one file of its
// own, beside the index at `path` ("<name>.tmap.index.json"), in parallel with the
// others: its part of each split tensor, and its share of the replicated tensors (each
// written once, by the rank given it: the ranks' bytes are balanced). Once every rank's
// file is durable, rank 0 writes the index: the commit. Until then the index at `path`
// is the previous checkpoint's, with all its files: a failure or a crash of any rank at
// any point leaves it whole and loadable. After the commit, rank 0 removes the files of
// the checkpoint replaced and those of saves that never committed.
//
// The result reads as the whole model everywhere a path is read (load, StateDict, the
// command line, Python), and loads at any world size with load_distributed, each rank
// reading only its part's bytes (zero-copy in map mode where that part lies in one file).
//
// Collective, as load_distributed: the models must have the same names, split shapes and
// dtypes on every rank (checked: Error(ModelMismatch) on every rank otherwise); an error
// on any rank is thrown on every rank, prefixed with that rank. options.format must be
// Format::Tensormap.
TENSORMAP_EXPORT void save_distributed(const torch::nn::Module& module, const std::string& path,
                                       c10d::ProcessGroup& group,
                                       const std::vector<std::pair<std::string, int64_t>>& splits,
                                       const SaveOptions& options = {});
#if TENSORMAP_C10D_HAS_BACKEND
TENSORMAP_EXPORT void save_distributed(const torch::nn::Module& module, const std::string& path, c10d::Backend& group,
                                       const std::vector<std::pair<std::string, int64_t>>& splits,
                                       const SaveOptions& options = {});
#endif

// A distributed save in the background (save_distributed_async). wait() is collective:
// every rank calls it, it waits for this rank's file, then rank 0 commits; an error of any
// rank is thrown on every rank. done() says whether this rank's file is written. A handle
// destroyed without wait() waits for its file and commits nothing: the previous checkpoint
// stays, and the next save collects the files. The group must outlive the handle.
class TENSORMAP_EXPORT DistributedSaveHandle {
 public:
  struct State;
  DistributedSaveHandle();  // nothing to wait for
  explicit DistributedSaveHandle(std::unique_ptr<State> state);
  DistributedSaveHandle(DistributedSaveHandle&&) noexcept;
  DistributedSaveHandle& operator=(DistributedSaveHandle&&) noexcept;
  ~DistributedSaveHandle();

  void wait();
  bool done() const;

 private:
  std::unique_ptr<State> state_;
};

// save_distributed, with each rank's file written by a child process from a snapshot of
// the call (save_async's). The call makes no collective: it checks this rank's model and
// forks, and returns. Everything that needs the other ranks happens in wait(): a save
// that could not start on some rank (fork refused, the folder missing, a tensor without
// data), and models that differ across ranks (ModelMismatch; each rank then removes the
// file it wrote), throw there, on every rank.
TENSORMAP_EXPORT DistributedSaveHandle
save_distributed_async(const torch::nn::Module& module, const std::string& path, c10d::ProcessGroup& group,
                       const std::vector<std::pair<std::string, int64_t>>& splits, const SaveOptions& options = {});
#if TENSORMAP_C10D_HAS_BACKEND
TENSORMAP_EXPORT DistributedSaveHandle
save_distributed_async(const torch::nn::Module& module, const std::string& path, c10d::Backend& group,
                       const std::vector<std::pair<std::string, int64_t>>& splits, const SaveOptions& options = {});
#endif

}  // namespace tensormap
