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
// nothing to tear down. A string is a view of the pickle's own bytes, which must outlive
// the document; a value is 24 bytes.
//
// Memory is bounded by the pickle's size. None, True, False, the empty tuple and the
// integers 0 to 255 are shared and cost nothing; everything else the machine holds (each
// value, each container's slots, the stack, the marks, the memo, the texts and tensors
// the objects make) is charged to the document's PickleBudget: 20 times the pickle's size
// plus 1 MiB, never more than 512 MiB. Past it, the pickle is refused with
// Error(UnsupportedArchive). The memo's indices must also stay below 2^24. Legitimate
// pickles hold 3 to 12 times their size: a state dict or a training checkpoint 9 to 11, a
// list of 16-bit integers (BININT2, the densest shape) 11.5; tests/core checks these.
// Every length is checked against the bytes left.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <string_view>
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

// What reading a pickle may hold, in bytes; what the caller does with the values (naming
// the tensors) is charged to it too.
class PickleBudget {
 public:
  static constexpr uint64_t kFactor = 20;
  static constexpr uint64_t kBase = uint64_t{1} << 20;
  static constexpr uint64_t kMax = uint64_t{512} << 20;

  explicit PickleBudget(uint64_t pickle_size);
  // Adds `bytes` to what is held; throws Error(UnsupportedArchive) naming `path` past the limit.
  void charge(uint64_t bytes, const std::string& path);
  uint64_t held() const { return held_; }
  uint64_t limit() const { return limit_; }

 private:
  uint64_t held_ = 0;
  uint64_t limit_;
};

struct PickleValue {
  enum class Kind : uint8_t { None, Bool, Int, Float, String, Tuple, List, Dict, Global, Storage, Tensor, Opaque };
  // What a Global names, as PickleObjects::global classified it.
  enum class Global : uint8_t {
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

  PickleValue() : boolean(false), untyped(false), unstored_tensor(false), script_object(false), built(false) {}

  Kind kind = Kind::None;
  Global global = Global::None;
  Dtype dtype = Dtype::U8;  // Global::StorageType, Global::TorchDtype, Storage
  bool boolean : 1;
  bool untyped : 1;          // Global::StorageType and Storage: an untyped storage
  bool unstored_tensor : 1;  // Opaque: made for a tensor of a dtype tensormap does not store
  bool script_object : 1;    // Dict: an object of a TorchScript class, built once
  bool built : 1;
  uint32_t text_size = 0;
  union {
    int64_t integer = 0;
    double real;             // Float
    uint64_t storage_bytes;  // Storage
  };
  union {
    // String: its bytes. Storage: its key. Global and Opaque: what it is
    // ("argparse.Namespace").
    const char* text_data = nullptr;
    // Tuple, List, Dict: the items; a Dict's are key, value, key, value... in insertion
    // order. Null while there are none.
    std::vector<PickleRef>* list;
    TensorDescription* tensor;  // Tensor
  };

  std::string_view text() const;  // empty but for String, Storage, Global and Opaque
  const std::vector<PickleRef>& items() const;
  size_t entry_count() const { return items().size() / 2; }
  const PickleValue& key(size_t i) const { return *items()[2 * i]; }
  const PickleValue& value(size_t i) const { return *items()[2 * i + 1]; }
};

// An unpickled value and every value made while reading it.
class PickleDocument {
 public:
  explicit PickleDocument(uint64_t pickle_size);
  PickleDocument(const PickleDocument&) = delete;
  PickleDocument& operator=(const PickleDocument&) = delete;

  PickleRef root = nullptr;
  PickleBudget budget;
  // Values made (the shared ones not counted).
  size_t size() const { return values_.size(); }

 private:
  friend class PickleMachine;
  std::deque<PickleValue> values_;
  std::deque<std::vector<PickleRef>> lists_;
  std::deque<std::string> texts_;
  std::deque<TensorDescription> tensors_;
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
  virtual PickleRef global(PickleMachine& m, std::string_view module, std::string_view name) = 0;
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
  // budget, as the others do.
  PickleRef make(PickleValue::Kind kind);
  // Gives `v` a copy of `text` as its text.
  void keep_text(PickleValue& v, std::string_view text);
  // Gives `v` the text of `other` (a view: nothing is copied).
  static void share_text(PickleValue& v, const PickleValue& other);
  // A new tensor description for `v`, with room for `rank` dimensions and a key of `key_size` bytes.
  TensorDescription& make_tensor(PickleValue& v, size_t rank, size_t key_size);
  // Holds `bytes` more, for what the objects keep beside the document.
  void charge(uint64_t bytes) { document_.budget.charge(bytes, path_); }
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
  std::string_view line();
  PickleRef string(uint64_t n);
  PickleRef integer(int64_t i);
  // A tuple or list of the `n` values at the top of the stack, which are popped.
  PickleRef sequence(PickleValue::Kind kind, size_t n);
  // Appends the values from stack slot `from` up to the top to `container`, and pops them.
  void append_from(PickleValue& container, size_t from);
  template <typename T>
  void reserve_charged(std::vector<T>& v, size_t needed);
  void push(PickleRef v) {
    reserve_charged(stack_, std::max<size_t>(stack_.size() + 1, 8));
    stack_.push_back(v);
  }
  size_t fence() const { return marks_.empty() ? 0 : marks_.back(); }
  PickleRef pop();
  PickleRef top() const;
  // The stack slot of the innermost MARK, which is removed.
  size_t pop_mark();
  void remember(uint64_t index);
  PickleRef recall(uint64_t index) const;
  PickleRef of_kind(PickleRef v, PickleValue::Kind kind, const char* what) const;

  PickleDocument& document_;
  PickleObjects& objects_;
  const unsigned char* p_;
  const unsigned char* end_;
  const std::string& path_;
  std::vector<PickleRef> stack_;
  std::vector<size_t> marks_;
  std::vector<PickleRef> memo_;  // by index; null where none was stored
  uint64_t memo_size_ = 0;       // entries stored
};

}  // namespace tensormap::detail
