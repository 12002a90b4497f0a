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

#include <string>
#include <utility>
#include <vector>

#include "tensormap/export.h"
#include "tensormap/load.h"

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

}  // namespace tensormap
