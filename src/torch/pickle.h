// A restricted unpickler for the pickles torch.save writes, internal to the LibTorch layer.
//
// LibTorch 1.13's own unpickler cannot read Python state dicts: it turns
// collections.OrderedDict into None and lacks the SETITEM opcode. This one understands
// the subset torch.save uses for tensors in (ordered) dicts, lists and tuples: pickle
// protocols 2 to 5, and the globals collections.OrderedDict, torch._utils's
// _rebuild_tensor_v2, _rebuild_tensor_v3 (torch 2.x, for dtypes such as float8 and
// uint16), _rebuild_parameter and _rebuild_parameter_with_state, torch.*Storage,
// torch.UntypedStorage and the torch dtypes.
//
// Nothing in a file is ever executed. Any other global (a class of the training script,
// argparse.Namespace, a numpy scalar) becomes an opaque value that remembers its name:
// calling or building it makes another opaque value, so a training checkpoint that holds
// such objects beside its tensors is still read, and the caller reports what it skipped.
// Every length is checked against the bytes left; memo and stack sizes are bounded by the
// input.
#pragma once

#include <ATen/core/Tensor.h>

#include "tensormap/dtype.h"

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace tensormap::detail {

struct PickleValue;
using PickleRef = std::shared_ptr<PickleValue>;

struct PickleValue {
  enum class Kind { None, Bool, Int, Float, String, Tuple, List, Dict, Global, Storage, Tensor, Opaque };
  enum class Global {
    None, OrderedDict, RebuildTensorV2, RebuildTensorV3, RebuildParameter, RebuildParameterWithState,
    StorageType, TorchDtype, Other
  };

  Kind kind = Kind::None;
  bool boolean = false;
  int64_t integer = 0;
  double real = 0;
  std::string text;
  std::vector<PickleRef> items;                           // Tuple, List
  std::vector<std::pair<PickleRef, PickleRef>> entries;   // Dict, in insertion order
  Global global = Global::None;
  c10::ScalarType storage_type = c10::ScalarType::Undefined;  // Global::StorageType, Storage
  Dtype dtype = Dtype::U8;  // Global::TorchDtype, and a Tensor's dtype as stored
  c10::Storage storage;
  // A Tensor. For a dtype this LibTorch lacks (1.13: U16, U32, U64, F8) its bytes with an
  // integer type of the same element size, which only raw-byte readers may use.
  at::Tensor tensor;
  // Global::Other and Opaque: what it is ("argparse.Namespace").
  std::string what;
};

// Returns the storage of record `key` holding `numel` elements of `type`; called once
// per key (the unpickler caches storages, so views share them).
using StorageLoader = std::function<c10::Storage(const std::string& key, c10::ScalarType type, int64_t numel)>;

// An unpickled value and everything made while reading it. A hostile pickle can build
// cycles (a dict holding itself through the memo); the document breaks them when it
// dies, so nothing leaks.
struct PickleDocument {
  PickleRef root;
  std::vector<PickleRef> all;
  ~PickleDocument() {
    for (const PickleRef& v : all) {
      v->items.clear();
      v->entries.clear();
    }
  }
};

// Unpickles `data`. Throws Error(UnsupportedArchive) naming `path` on anything outside
// the subset, or on malformed input.
std::unique_ptr<PickleDocument> unpickle(const unsigned char* data, size_t size,
                                         const StorageLoader& load_storage, const std::string& path);

}  // namespace tensormap::detail
