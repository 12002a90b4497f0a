// A restricted unpickler for torch.save's pickles: see pickle.h for the subset.
#include "pickle.h"

#include <cstring>
#include <unordered_map>

#include "bytes.h"
#include "names.h"
#include "tensormap/error.h"
#include "tensormap/format.h"
#include "torch_names.h"

namespace tensormap::detail {
namespace {

using Kind = PickleValue::Kind;
using Global = PickleValue::Global;

// Every value goes into the document being read, so that its destructor can break cycles.
thread_local PickleDocument* current_document = nullptr;

PickleRef make(Kind kind) {
  auto v = std::make_shared<PickleValue>();
  v->kind = kind;
  current_document->all.push_back(v);
  return v;
}

class Unpickler {
 public:
  Unpickler(const unsigned char* data, size_t size, const StorageCheck& check, const std::string& path)
      : p_(data), end_(data + size), check_(check), path_(path) {}

  PickleRef run() {
    while (true) {
      const unsigned char op = byte();
      if (op == '.') {  // STOP
        if (stack_.size() != 1) fail("STOP with " + std::to_string(stack_.size()) + " values on the stack");
        return stack_.back();
      }
      if (!framing(op) && !scalars(op) && !containers(op) && !calls(op)) fail("unsupported pickle opcode 0x" + hex(op));
    }
  }

  // Protocol, framing, the memo, marks and the stack itself; false if `op` is none of them.
  bool framing(unsigned char op) {
    switch (op) {
      case 0x80: byte(); break;                        // PROTO
      case 0x95: bytes(8); break;                      // FRAME: lengths only
      case 'q': memo_[byte()] = top(); break;          // BINPUT
      case 'r': memo_[u32()] = top(); break;           // LONG_BINPUT
      case 0x94: memo_[memo_.size()] = top(); break;   // MEMOIZE
      case 'h': push(memo(byte())); break;             // BINGET
      case 'j': push(memo(u32())); break;              // LONG_BINGET
      case '(': marks_.push_back(stack_.size()); break;  // MARK
      case '0': pop(); break;                          // POP
      case '1': pop_mark(); break;                     // POP_MARK
      case '2': push(top()); break;                    // DUP
      default:
        return false;
    }
    return true;
  }

  // Values: None, booleans, integers, floats, strings and bytes; false if `op` is none of them.
  bool scalars(unsigned char op) {
    switch (op) {
      case 'N': push(make(Kind::None)); break;
      case 0x88: case 0x89: {                          // NEWTRUE, NEWFALSE
        auto v = make(Kind::Bool);
        v->boolean = op == 0x88;
        push(v);
        break;
      }
      case 'J': push(integer(static_cast<int32_t>(u32()))); break;  // BININT
      case 'K': push(integer(byte())); break;                       // BININT1
      case 'M': push(integer(u16())); break;                        // BININT2
      case 0x8a: {                                                   // LONG1
        const size_t n = byte();
        if (n > 8) fail("integer of " + std::to_string(n) + " bytes");
        const unsigned char* b = bytes(n);
        uint64_t v = 0;
        for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(b[i]) << (8 * i);
        if (n > 0 && n < 8 && (b[n - 1] & 0x80)) v |= ~uint64_t{0} << (8 * n);  // sign-extend
        push(integer(static_cast<int64_t>(v)));
        break;
      }
      case 'G': {                                      // BINFLOAT, big-endian
        const unsigned char* b = bytes(8);
        uint64_t bits = 0;
        for (int i = 0; i < 8; ++i) bits = (bits << 8) | b[i];
        auto v = make(Kind::Float);
        std::memcpy(&v->real, &bits, 8);
        push(v);
        break;
      }
      case 'X': push(string(u32())); break;            // BINUNICODE
      case 0x8c: push(string(byte())); break;          // SHORT_BINUNICODE
      case 0x8d: push(string(u64())); break;           // BINUNICODE8
      case 'U': case 'C': push(string(byte())); break;  // SHORT_BINSTRING, SHORT_BINBYTES
      case 'T': case 'B': push(string(u32())); break;  // BINSTRING, BINBYTES
      case 0x8e: push(string(u64())); break;           // BINBYTES8
      default:
        return false;
    }
    return true;
  }

  // Tuples, lists, dicts and sets; false if `op` is none of them.
  bool containers(unsigned char op) {
    switch (op) {
      case ')': push(make(Kind::Tuple)); break;        // EMPTY_TUPLE
      case 't': push(sequence(Kind::Tuple, pop_mark())); break;  // TUPLE
      case 0x85: case 0x86: case 0x87: {               // TUPLE1..3
        const size_t n = op - 0x84u;
        if (stack_.size() < fence() + n) fail("tuple of " + std::to_string(n) + " reaches below a MARK");
        std::vector<PickleRef> items(stack_.end() - static_cast<long>(n), stack_.end());
        stack_.resize(stack_.size() - n);
        push(sequence(Kind::Tuple, std::move(items)));
        break;
      }
      case ']': push(make(Kind::List)); break;         // EMPTY_LIST
      case 'a': {                                      // APPEND
        const PickleRef item = pop();
        of_kind(top(), Kind::List, "APPEND")->items.push_back(item);
        break;
      }
      case 'e': {                                      // APPENDS
        auto items = pop_mark();
        auto& list = of_kind(top(), Kind::List, "APPENDS")->items;
        list.insert(list.end(), items.begin(), items.end());
        break;
      }
      case '}': push(make(Kind::Dict)); break;         // EMPTY_DICT
      case 's': {                                      // SETITEM
        const PickleRef value = pop(), key = pop();
        of_kind(top(), Kind::Dict, "SETITEM")->entries.emplace_back(key, value);
        break;
      }
      case 'u': {                                      // SETITEMS
        auto items = pop_mark();
        if (items.size() % 2) fail("SETITEMS with an odd number of items");
        auto& dict = of_kind(top(), Kind::Dict, "SETITEMS")->entries;
        for (size_t i = 0; i < items.size(); i += 2) dict.emplace_back(items[i], items[i + 1]);
        break;
      }
      case 0x8f: push(make(Kind::List)); break;        // EMPTY_SET: read as a list
      case 0x90: {                                     // ADDITEMS
        auto items = pop_mark();
        auto& set = of_kind(top(), Kind::List, "ADDITEMS")->items;
        set.insert(set.end(), items.begin(), items.end());
        break;
      }
      case 0x91: push(sequence(Kind::List, pop_mark())); break;  // FROZENSET
      default:
        return false;
    }
    return true;
  }

  // Globals, and what calls or builds objects: the only opcodes that make tensors; false if `op` is none of them.
  bool calls(unsigned char op) {
    switch (op) {
      case 'c': {                                      // GLOBAL
        const std::string module = line();
        push(global(module, line()));
        break;
      }
      case 0x93: {                                     // STACK_GLOBAL
        const PickleRef name = pop(), module = pop();
        if (module->kind != Kind::String || name->kind != Kind::String) fail("STACK_GLOBAL needs two strings");
        push(global(module->text, name->text));
        break;
      }
      case 'R': {                                      // REDUCE
        const PickleRef args = pop(), callable = pop();
        push(reduce(*callable, *of_kind(args, Kind::Tuple, "REDUCE arguments")));
        break;
      }
      case 'b': {                                      // BUILD
        const PickleRef state = pop();  // for an OrderedDict, its _metadata attribute, not needed
        if (top()->kind != Kind::Dict && top()->kind != Kind::Opaque) fail("BUILD on something other than a dict or an object");
        if (top()->script_object) build_script_object(*top(), state);
        break;
      }
      case 0x81: {                                     // NEWOBJ: cls.__new__(cls, *args)
        pop();
        push(new_object(*pop()));
        break;
      }
      case 0x92: {                                     // NEWOBJ_EX: with keyword arguments
        pop();
        pop();
        push(opaque(*pop()));
        break;
      }
      case 'Q': push(persistent(*pop())); break;       // BINPERSID
      default:
        return false;
    }
    return true;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(ErrorKind::UnsupportedArchive, path_ + ": data.pkl: " + what);
  }
  static std::string hex(unsigned v) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "%02x", v);
    return buf;
  }
  const unsigned char* bytes(uint64_t n) {
    if (static_cast<uint64_t>(end_ - p_) < n) fail("ends in the middle of an opcode");
    const unsigned char* at = p_;
    p_ += n;
    return at;
  }
  unsigned char byte() { return *bytes(1); }
  uint16_t u16() { return load_le<uint16_t>(bytes(2)); }
  uint32_t u32() { return load_le<uint32_t>(bytes(4)); }
  uint64_t u64() { return load_le<uint64_t>(bytes(8)); }
  std::string line() {
    const auto* nl = static_cast<const unsigned char*>(std::memchr(p_, '\n', static_cast<size_t>(end_ - p_)));
    if (!nl) fail("GLOBAL without a newline");
    std::string s(reinterpret_cast<const char*>(p_), static_cast<size_t>(nl - p_));
    p_ = nl + 1;
    return s;
  }
  PickleRef string(uint64_t n) {
    auto v = make(Kind::String);
    const unsigned char* b = bytes(n);
    v->text.assign(reinterpret_cast<const char*>(b), n);
    return v;
  }
  static PickleRef integer(int64_t i) {
    auto v = make(Kind::Int);
    v->integer = i;
    return v;
  }
  void push(PickleRef v) { stack_.push_back(std::move(v)); }
  // Values below the innermost MARK belong to an enclosing construct: no opcode but the
  // mark-consuming ones may take them (CPython's "stack underflow").
  size_t fence() const { return marks_.empty() ? 0 : marks_.back(); }
  PickleRef pop() {
    if (stack_.size() <= fence()) fail("pops an empty stack or below a MARK");
    PickleRef v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  const PickleRef& top() const {
    if (stack_.empty()) fail("reads an empty stack");
    return stack_.back();
  }
  std::vector<PickleRef> pop_mark() {
    if (marks_.empty()) fail("no MARK to pop to");
    const size_t mark = marks_.back();
    marks_.pop_back();
    if (mark > stack_.size()) fail("a MARK above the top of the stack");
    std::vector<PickleRef> items(stack_.begin() + static_cast<long>(mark), stack_.end());
    stack_.resize(mark);
    return items;
  }
  PickleRef memo(uint64_t i) const {
    const auto it = memo_.find(i);
    if (it == memo_.end()) fail("reads memo " + std::to_string(i) + ", which was never stored");
    return it->second;
  }
  static PickleRef sequence(Kind kind, std::vector<PickleRef> items) {
    auto v = make(kind);
    v->items = std::move(items);
    return v;
  }
  const PickleRef& of_kind(const PickleRef& v, Kind kind, const char* what) const {
    if (v->kind != kind) fail(std::string(what) + " on the wrong kind of value");
    return v;
  }

  PickleRef global(const std::string& module, const std::string& name) {
    auto v = make(Kind::Global);
    if (module == "collections" && name == "OrderedDict") {
      v->global = Global::OrderedDict;
    } else if (module == "torch._utils" && name == "_rebuild_tensor_v2") {
      v->global = Global::RebuildTensorV2;
    } else if (module == "torch._utils" && name == "_rebuild_tensor_v3") {
      v->global = Global::RebuildTensorV3;
    } else if (module == "torch._utils" && name == "_rebuild_parameter") {
      v->global = Global::RebuildParameter;
    } else if (module == "torch._utils" && name == "_rebuild_parameter_with_state") {
      v->global = Global::RebuildParameterWithState;
    } else if (module == "torch" && dtype_of_storage_class(name)) {
      v->global = Global::StorageType;
      v->dtype = *dtype_of_storage_class(name);
    } else if ((module == "torch.storage" || module == "torch") && name == "UntypedStorage") {  // torch 2.x, v3
      v->global = Global::StorageType;
      v->untyped = true;
    } else if (module == "torch" && dtype_of_torch_name(name)) {
      v->global = Global::TorchDtype;
      v->dtype = *dtype_of_torch_name(name);
    } else if (module == "__torch__" || module.rfind("__torch__.", 0) == 0) {
      v->global = Global::ScriptClass;  // instantiated empty, then given its attributes
    } else {
      v->global = Global::Other;  // never called: whatever it makes stays opaque
    }
    v->what = module + "." + name;
    return v;
  }

  // cls.__new__(cls): an empty object of a TorchScript class, whose attributes its BUILD
  // gives; an opaque value for any other class.
  PickleRef new_object(const PickleValue& callable) {
    if (callable.kind != Kind::Global || callable.global != Global::ScriptClass) return opaque(callable);
    auto v = make(Kind::Dict);
    v->script_object = true;
    v->what = callable.what;
    return v;
  }

  // BUILD of a TorchScript object: its state is the dict of its attributes, given once.
  void build_script_object(PickleValue& object, const PickleRef& state) {
    if (object.built) fail("BUILD twice on the object of " + object.what);
    if (state->kind != Kind::Dict) fail("BUILD of the object of " + object.what + " with a state that is not a dict");
    if (state.get() == &object) fail("BUILD of the object of " + object.what + " with itself as its state");
    object.entries = state->entries;
    object.built = true;
  }

  // What calling or instantiating `callable` would have made, without doing it.
  static PickleRef opaque(const PickleValue& callable) {
    auto v = make(Kind::Opaque);
    v->what = callable.kind == Kind::Global || callable.kind == Kind::Opaque ? callable.what : "an object";
    return v;
  }

  // The tensor over `storage` that _rebuild_tensor_v2/v3 describe, checked to lie inside
  // it: the last element it reaches, offset + sum((size - 1) * stride), must be inside.
  PickleRef tensor(const PickleValue& storage, const PickleRef& offset, const PickleRef& size,
                   const PickleRef& stride, Dtype dtype) {
    if (offset->kind != Kind::Int || offset->integer < 0) fail("a tensor with a bad storage offset");
    auto v = make(Kind::Tensor);
    TensorDescription& t = v->tensor;
    t.key = storage.text;
    t.dtype = dtype;
    t.offset = static_cast<uint64_t>(offset->integer);
    t.sizes = ints(size, "a tensor's size");
    t.strides = ints(stride, "a tensor's stride");
    if (t.sizes.size() != t.strides.size()) fail("a tensor whose size and stride differ in length");
    if (t.sizes.size() > 64) fail("a tensor of rank " + std::to_string(t.sizes.size()));
    std::vector<uint64_t> shape(t.sizes.begin(), t.sizes.end());
    const auto bytes = format::tensor_byte_length(shape.data(), static_cast<unsigned>(shape.size()), dtype_size(dtype));
    if (!bytes) fail("a tensor of " + std::to_string(shape.size()) + " dimensions too large to address");
    if (*bytes == 0) return v;
    std::optional<uint64_t> last = t.offset;
    for (size_t d = 0; d < shape.size() && last; ++d) {
      const auto step = checked_mul(shape[d] - 1, static_cast<uint64_t>(t.strides[d]));
      last = step ? checked_add(*last, *step) : std::nullopt;
    }
    const auto end = last ? checked_add(*last, 1) : std::nullopt;
    const auto end_bytes = end ? checked_mul(*end, dtype_size(dtype)) : std::nullopt;
    if (!end_bytes || *end_bytes > storage.storage_bytes) {
      fail("a tensor does not fit its storage " + quoted(storage.text) + " of " +
           std::to_string(storage.storage_bytes) + " bytes");
    }
    return v;
  }

  PickleRef persistent(const PickleValue& pid) {
    // ('storage', storage type, key, location, number of elements)
    if (pid.kind != Kind::Tuple || pid.items.size() != 5 || pid.items[0]->text != "storage" ||
        pid.items[1]->kind != Kind::Global ||
        (pid.items[1]->global != Global::StorageType && pid.items[1]->global != Global::Other) ||
        pid.items[2]->kind != Kind::String || pid.items[4]->kind != Kind::Int || pid.items[4]->integer < 0) {
      fail("a persistent id that is not a storage reference");
    }
    if (pid.items[1]->global == Global::Other) {  // a storage of a dtype tensormap does not store
      auto v = make(Kind::Opaque);                 // (torch.ComplexHalfStorage): its tensors are skipped
      v->what = pid.items[1]->what;
      return v;
    }
    const std::string& key = pid.items[2]->text;
    auto it = storages_.find(key);
    if (it == storages_.end()) {
      auto v = make(Kind::Storage);
      const PickleValue& type = *pid.items[1];
      v->untyped = type.untyped;
      v->dtype = type.dtype;
      v->text = key;
      // An untyped storage counts bytes; a typed one, elements.
      const auto bytes = checked_mul(static_cast<uint64_t>(pid.items[4]->integer), type.untyped ? 1 : dtype_size(type.dtype));
      if (!bytes || *bytes > format::kMaxFileOffset) fail("storage " + quoted(key) + " is too large to address");
      v->storage_bytes = *bytes;
      check_(key, *bytes);
      it = storages_.emplace(key, v).first;
    }
    return it->second;
  }

  std::vector<int64_t> ints(const PickleRef& v, const char* what) const {
    if (v->kind != Kind::Tuple) fail(std::string(what) + " is not a tuple");
    std::vector<int64_t> out;
    for (const auto& item : v->items) {
      if (item->kind != Kind::Int || item->integer < 0) fail(std::string(what) + " holds a value that is not a non-negative integer");
      out.push_back(item->integer);
    }
    return out;
  }

  PickleRef reduce(const PickleValue& callable, const PickleValue& args) {
    if (callable.kind == Kind::Opaque) return opaque(callable);
    if (callable.kind != Kind::Global) fail("REDUCE of something that is not a global");
    const auto& a = args.items;
    switch (callable.global) {
      case Global::OrderedDict:
        if (!a.empty()) fail("OrderedDict with arguments");
        return make(Kind::Dict);
      case Global::RebuildTensorV2:
        // (storage, storage offset, size, stride, requires_grad, hooks[, metadata])
        if (a.size() >= 4 && a[0]->kind == Kind::Opaque) {  // a storage type tensormap does not store
          auto v = make(Kind::Opaque);
          v->what = "a tensor over " + a[0]->what;
          v->unstored_tensor = true;
          return v;
        }
        if (a.size() < 4 || a[0]->kind != Kind::Storage) fail("_rebuild_tensor_v2 with unexpected arguments");
        if (a[0]->untyped) fail("_rebuild_tensor_v2 over an untyped storage");
        return tensor(*a[0], a[1], a[2], a[3], a[0]->dtype);
      case Global::RebuildTensorV3: {
        // (untyped storage, storage offset, size, stride, requires_grad, hooks, dtype[, metadata])
        if (a.size() < 7 || a[0]->kind != Kind::Storage || !a[0]->untyped ||
            a[6]->kind != Kind::Global) {
          fail("_rebuild_tensor_v3 with unexpected arguments");
        }
        if (a[6]->global != Global::TorchDtype) {  // a dtype tensormap does not store: skipped
          auto v = make(Kind::Opaque);
          v->what = "a tensor of " + a[6]->what;
          v->unstored_tensor = true;
          return v;
        }
        return tensor(*a[0], a[1], a[2], a[3], a[6]->dtype);
      }
      case Global::RebuildParameter:
      case Global::RebuildParameterWithState:
        if (a.empty() || (a[0]->kind != Kind::Tensor && a[0]->kind != Kind::Opaque)) {
          fail("_rebuild_parameter without a tensor");
        }
        return a[0];
      case Global::ScriptClass:
      case Global::Other:
        return opaque(callable);
      default:
        fail("REDUCE of " + callable.what + ", which is not callable");
    }
  }

  const unsigned char* p_;
  const unsigned char* end_;
  const StorageCheck& check_;
  const std::string& path_;
  std::vector<PickleRef> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, PickleRef> memo_;
  std::unordered_map<std::string, PickleRef> storages_;
};

}  // namespace

std::unique_ptr<PickleDocument> unpickle(const unsigned char* data, size_t size,
                                         const StorageCheck& check_storage, const std::string& path) {
  auto document = std::make_unique<PickleDocument>();
  PickleDocument* const outer = current_document;  // unpickling never nests, but stay safe
  current_document = document.get();
  try {
    document->root = Unpickler(data, size, check_storage, path).run();
  } catch (...) {
    current_document = outer;
    throw;  // `document` breaks the cycles of what was read so far
  }
  current_document = outer;
  return document;
}

}  // namespace tensormap::detail
