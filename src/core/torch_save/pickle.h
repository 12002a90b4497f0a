// A bounded pickle machine: the opcodes of pickle protocols 2 to 5 that build plain data
// (None, booleans, integers, floats, strings and bytes, tuples, lists, dicts, sets), with
// the stack, the marks and the memo. Internal to the core.
//
// The machine executes nothing. What a pickle names (GLOBAL) and what it calls or builds
// (REDUCE, NEWOBJ, BUILD, BINPERSID) is decided by the PickleObjects given to it; the
// objects of torch.save archives are in torch_pickle.h.
//
// Values live in an arena owned by their PickleDocument and refer to each other by plain
// pointers, so a pickle that builds a cycle (a dict holding itself through the memo) costs
// nothing to tear down. Memory is bounded: None, True, False, the empty tuple and the
// integers 0 to 255 are shared; every other value (about 100 bytes) counts against a
// budget of 4096 + size / 2 values, at most 2^22, and the memo against one of 2^22
// entries; past either, the pickle is refused. So a pickle costs at most about 50 times
// its size, and never more than about 600 MiB, whatever its size. Legitimate pickles
// make one value per 6 to 7 bytes (a state dict, an optimizer's state: 2^22 values is a
// checkpoint of some 250,000 tensors). Every length is checked against the bytes left.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "tensormap/dtype.h"

namespace tensormap::detail {

// A tensor as torch.save describes it: elements of `dtype` inside storage record `key`.
// Checked: every element lies within the storage's bytes, and the byte length fits 2^63.
struct TensorDescription {
  std::string key;  // the storage's record, "data/<key>" in the archive
  Dtype dtype = Dtype::U8;
  uint64_t offset = 0;  // in elements, from the storage's start
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;  // in elements, each >= 0
};

struct PickleValue;
using PickleRef = PickleValue*;  // into the arena of the document being read

struct PickleValue {
  enum class Kind { None, Bool, Int, Float, String, Tuple, List, Dict, Global, Storage, Tensor, Opaque };
  // What a Global names, as PickleObjects::global classified it.
  enum class Global {
    None,
    OrderedDict,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    StorageType,
    TorchDtype,
    ScriptClass,
    Other
  };

  Kind kind = Kind::None;
  Global global = Global::None;
  Dtype dtype = Dtype::U8;  // Global::StorageType, Global::TorchDtype, Storage
  bool boolean = false;
  bool untyped = false;          // Global::StorageType and Storage: an untyped storage
  bool unstored_tensor = false;  // Opaque: made for a tensor of a dtype tensormap does not store
  bool script_object = false;    // Dict: an object of TorchScript class `text`, built once
  bool built = false;
  union {
    int64_t integer = 0;
    double real;             // Float
    uint64_t storage_bytes;  // Storage
  };
  // String: its bytes. Storage: its key. Global and Opaque: what it is
  // ("argparse.Namespace"). A script object's Dict: its class.
  std::string text;
  // Tuple, List: the items. Dict: key, value, key, value... in insertion order.
  std::vector<PickleRef> items;
  std::unique_ptr<TensorDescription> tensor;  // Tensor

  size_t entry_count() const { return items.size() / 2; }
  const PickleValue& key(size_t i) const { return *items[2 * i]; }
  const PickleValue& value(size_t i) const { return *items[2 * i + 1]; }
};

// An unpickled value and every value made while reading it.
class PickleDocument {
 public:
  PickleDocument();
  PickleDocument(const PickleDocument&) = delete;
  PickleDocument& operator=(const PickleDocument&) = delete;

  PickleRef root = nullptr;
  // Values made (the shared ones not counted).
  size_t size() const { return values_.size(); }

 private:
  friend class PickleMachine;
  std::deque<PickleValue> values_;
  PickleValue none_, true_, false_, empty_tuple_;
  PickleValue small_[256];  // the integers 0 to 255
};

// What the names in a pickle mean and what calling them makes. The machine hands each
// hook the document to make values in (PickleMachine::make) and throws what the hook
// throws.
class PickleMachine;
class PickleObjects {
 public:
  virtual ~PickleObjects() = default;
  virtual PickleRef global(PickleMachine& m, const std::string& module, const std::string& name) = 0;
  virtual PickleRef reduce(PickleMachine& m, const PickleValue& callable, const PickleValue& args) = 0;
  // cls.__new__(cls, *args) (NEWOBJ), or with keyword arguments too (NEWOBJ_EX).
  virtual PickleRef new_object(PickleMachine& m, const PickleValue& cls, bool keywords) = 0;
  // BUILD: `object` (the top of the stack) given `state`.
  virtual void build(PickleMachine& m, PickleValue& object, const PickleValue& state) = 0;
  virtual PickleRef persistent(PickleMachine& m, const PickleValue& pid) = 0;
};

class PickleMachine {
 public:
  PickleMachine(PickleDocument& document, PickleObjects& objects, const unsigned char* data, size_t size,
                const std::string& path);

  // Runs to STOP; the value left is the document's root.
  void run();

  // A new value of `kind` in the document. Throws Error(UnsupportedArchive) past the
  // value budget.
  PickleRef make(PickleValue::Kind kind);
  [[noreturn]] void fail(const std::string& what) const;
  const std::string& path() const { return path_; }

 private:
  bool framing(unsigned char op);
  bool scalars(unsigned char op);
  bool containers(unsigned char op);
  bool calls(unsigned char op);

  const unsigned char* bytes(uint64_t n);
  unsigned char byte() { return *bytes(1); }
  uint16_t u16();
  uint32_t u32();
  uint64_t u64();
  std::string line();
  PickleRef string(uint64_t n);
  PickleRef integer(int64_t i);
  PickleRef sequence(PickleValue::Kind kind, std::vector<PickleRef> items);
  void push(PickleRef v) { stack_.push_back(v); }
  size_t fence() const { return marks_.empty() ? 0 : marks_.back(); }
  PickleRef pop();
  PickleRef top() const;
  std::vector<PickleRef> pop_mark();
  void remember(uint64_t index);
  PickleRef recall(uint64_t index) const;
  PickleRef of_kind(PickleRef v, PickleValue::Kind kind, const char* what) const;

  PickleDocument& document_;
  PickleObjects& objects_;
  const unsigned char* p_;
  const unsigned char* end_;
  const std::string& path_;
  size_t budget_;  // values that may still be made
  std::vector<PickleRef> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, PickleRef> memo_;  // at most 2^23 entries
};

}  // namespace tensormap::detail
