// What the pickles of torch.save archives name, for the bounded pickle machine (pickle.h).
// Internal to the core.
//
// The globals collections.OrderedDict, torch._utils's _rebuild_tensor_v2,
// _rebuild_tensor_v3 (torch 2.x, for dtypes such as float8 and uint16),
// _rebuild_parameter and _rebuild_parameter_with_state, torch.*Storage,
// torch.UntypedStorage and the torch dtypes (their names: torch_names.h). The archives
// LibTorch writes (torch::save of a module or a tensor list, OutputArchive::save_to) and
// torch.jit.save are such zips too: their pickle builds objects of TorchScript classes
// (globals of the module __torch__ or below it) from a dict of attributes. Such an object
// is read as that dict: no class is looked up and none of the archive's code/ is read.
//
// Nothing in a file is ever executed, and no tensor is made: a tensor is described (its
// storage record, dtype, offset, sizes and strides) and checked to lie inside its storage.
// Any other global (a class of the training script, argparse.Namespace, a numpy scalar)
// becomes an opaque value that remembers its name: calling or building it makes another
// opaque value, so a training checkpoint that holds such objects beside its tensors is
// still read, and the caller reports what it skipped.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "torch_save/pickle.h"

namespace tensormap::detail {

// Checks that record `key` exists and holds at least `bytes` bytes; called once per key
// (storages are cached, so views share them). Throws Error(UnsupportedArchive) otherwise.
using StorageCheck = std::function<void(const std::string& key, uint64_t bytes)>;

// Unpickles the data.pkl of a torch.save archive. Throws Error(UnsupportedArchive) naming
// `path` on anything outside the subset, on malformed input, or past the machine's bounds.
std::unique_ptr<PickleDocument> unpickle(const unsigned char* data, size_t size, const StorageCheck& check_storage,
                                         const std::string& path);

}  // namespace tensormap::detail
