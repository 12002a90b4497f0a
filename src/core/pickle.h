// A restricted unpickler for the pickles torch.save writes. Internal to the core.
//
// The subset torch.save uses for tensors in (ordered) dicts, lists and tuples: pickle
// protocols 2 to 5, and the globals collections.OrderedDict, torch._utils's
// _rebuild_tensor_v2, _rebuild_tensor_v3 (torch 2.x, for dtypes such as float8 and
// uint16), _rebuild_parameter and _rebuild_parameter_with_state, torch.*Storage,
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
// still read, and the caller reports what it skipped. Every length is checked against the
// bytes left; memo and stack sizes are bounded by the input.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tensormap/dtype.h"

namespace tensormap::detail {

struct PickleValue;
using PickleRef = std::shared_ptr<PickleValue>;

// A tensor as torch.save describes it: elements of `dtype` inside storage record `key`.
// Checked: every element lies within the storage's bytes, and the byte length fits 2^63.
struct TensorDescription {
  std::string key;               // the storage's record, "data/<key>" in the archive
  Dtype dtype = Dtype::U8;
  uint64_t offset = 0;           // in elements, from the storage's start
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;  // in elements, each >= 0
};

struct PickleValue {
  enum class Kind { None, Bool, Int, Float, String, Tuple, List, Dict, Global, Storage, Tensor, Opaque };
  enum class Global {
    None, OrderedDict, RebuildTensorV2, RebuildTensorV3, RebuildParameter, RebuildParameterWithState,
    StorageType, TorchDtype, ScriptClass, Other
  };

  Kind kind = Kind::None;
  bool boolean = false;
  int64_t integer = 0;
  double real = 0;
  std::string text;                                       // String; Storage: its key
  std::vector<PickleRef> items;                           // Tuple, List
  std::vector<std::pair<PickleRef, PickleRef>> entries;   // Dict, in insertion order
  Global global = Global::None;
  // Global::StorageType and Storage: the element dtype, or nothing for an untyped storage.
  bool untyped = false;
  Dtype dtype = Dtype::U8;  // Global::StorageType, Global::TorchDtype, Storage
  uint64_t storage_bytes = 0;  // Storage
  TensorDescription tensor;    // Tensor
  // Global::Other and Opaque: what it is ("argparse.Namespace"). An Opaque made for a
  // tensor of a dtype tensormap does not store sets `unstored_tensor`.
  std::string what;
  bool unstored_tensor = false;
  // Dict: an object of TorchScript class `what`, its attributes as entries; built once.
  bool script_object = false;
  bool built = false;
};

// Checks that record `key` exists and holds at least `bytes` bytes; called once per key
// (storages are cached, so views share them). Throws Error(UnsupportedArchive) otherwise.
using StorageCheck = std::function<void(const std::string& key, uint64_t bytes)>;

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
                                         const StorageCheck& check_storage, const std::string& path);

}  // namespace tensormap::detail
