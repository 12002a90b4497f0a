// Internal to the LibTorch layer: save() with a view of its progress, for the background
// save's child (save_async.cpp), which gives back each tensor's pages once it is written.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "tensormap/save.h"

namespace tensormap::detail {

struct SaveObserver {
  virtual ~SaveObserver() = default;
  // Before anything is written: which tensors' bytes will be read (false: an alias of an
  // earlier one, or empty).
  virtual void planned(const std::vector<bool>& read) = 0;
  // Tensor i's bytes have all been written (pwrite has returned): the save never reads
  // them again.
  virtual void written(size_t i) = 0;
};

void save_observed(const std::vector<std::pair<std::string, at::Tensor>>& tensors, const std::string& path,
                   const SaveOptions& options, SaveObserver* observer);

}  // namespace tensormap::detail
