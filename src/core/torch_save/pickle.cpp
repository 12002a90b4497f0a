// The bounded pickle machine: see pickle.h.
#include "torch_save/pickle.h"

#include <cstdio>
#include <cstring>

#include "tensormap/error.h"
#include "util/bytes.h"

namespace tensormap::detail {
namespace {

using Kind = PickleValue::Kind;

constexpr size_t kMaxValues = size_t{1} << 22;
constexpr size_t kMaxMemo = size_t{1} << 22;

std::string hex(unsigned v) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "%02x", v);
  return buf;
}

}  // namespace

PickleDocument::PickleDocument() {
  none_.kind = Kind::None;
  true_.kind = false_.kind = Kind::Bool;
  true_.boolean = true;
  empty_tuple_.kind = Kind::Tuple;
  for (int i = 0; i < 256; ++i) {
    small_[i].kind = Kind::Int;
    small_[i].integer = i;
  }
}

PickleMachine::PickleMachine(PickleDocument& document, PickleObjects& objects, const unsigned char* data, size_t size,
                             const std::string& path)
    : document_(document),
      objects_(objects),
      p_(data),
      end_(data + size),
      path_(path),
      budget_(std::min(kMaxValues, size_t{4096} + size / 2)) {}

void PickleMachine::fail(const std::string& what) const {
  throw Error(ErrorKind::UnsupportedArchive, path_ + ": data.pkl: " + what);
}

PickleRef PickleMachine::make(Kind kind) {
  if (budget_ == 0) {
    fail("makes more than " + std::to_string(document_.values_.size()) +
         " values, more than a pickle of its size can describe (4096 plus one per 2 bytes, at most 2^22)");
  }
  --budget_;
  PickleValue& v = document_.values_.emplace_back();
  v.kind = kind;
  return &v;
}

void PickleMachine::run() {
  while (true) {
    const unsigned char op = byte();
    if (op == '.') {  // STOP
      if (stack_.size() != 1) fail("STOP with " + std::to_string(stack_.size()) + " values on the stack");
      document_.root = stack_.back();
      return;
    }
    if (!framing(op) && !scalars(op) && !containers(op) && !calls(op)) fail("unsupported pickle opcode 0x" + hex(op));
  }
}

// Protocol, framing, the memo, marks and the stack itself; false if `op` is none of them.
bool PickleMachine::framing(unsigned char op) {
  switch (op) {
    case 0x80: byte(); break;                          // PROTO
    case 0x95: bytes(8); break;                        // FRAME: lengths only
    case 'q': remember(byte()); break;                 // BINPUT
    case 'r': remember(u32()); break;                  // LONG_BINPUT
    case 0x94: remember(memo_.size()); break;          // MEMOIZE
    case 'h': push(recall(byte())); break;             // BINGET
    case 'j': push(recall(u32())); break;              // LONG_BINGET
    case '(': marks_.push_back(stack_.size()); break;  // MARK
    case '0': pop(); break;                            // POP
    case '1': pop_mark(); break;                       // POP_MARK
    case '2': push(top()); break;                      // DUP
    default: return false;
  }
  return true;
}

// Values: None, booleans, integers, floats, strings and bytes; false if `op` is none of them.
bool PickleMachine::scalars(unsigned char op) {
  switch (op) {
    case 'N': push(&document_.none_); break;
    case 0x88: push(&document_.true_); break;                     // NEWTRUE
    case 0x89: push(&document_.false_); break;                    // NEWFALSE
    case 'J': push(integer(static_cast<int32_t>(u32()))); break;  // BININT
    case 'K': push(&document_.small_[byte()]); break;             // BININT1: shared
    case 'M': push(integer(u16())); break;                        // BININT2
    case 0x8a: {                                                  // LONG1
      const size_t n = byte();
      if (n > 8) fail("integer of " + std::to_string(n) + " bytes");
      const unsigned char* b = bytes(n);
      uint64_t v = 0;
      for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(b[i]) << (8 * i);
      if (n > 0 && n < 8 && (b[n - 1] & 0x80)) v |= ~uint64_t{0} << (8 * n);  // sign-extend
      push(integer(static_cast<int64_t>(v)));
      break;
    }
    case 'G': {  // BINFLOAT, big-endian
      const unsigned char* b = bytes(8);
      uint64_t bits = 0;
      for (int i = 0; i < 8; ++i) bits = (bits << 8) | b[i];
      const PickleRef v = make(Kind::Float);
      std::memcpy(&v->real, &bits, 8);
      push(v);
      break;
    }
    case 'X': push(string(u32())); break;    // BINUNICODE
    case 0x8c: push(string(byte())); break;  // SHORT_BINUNICODE
    case 0x8d: push(string(u64())); break;   // BINUNICODE8
    case 'U':
    case 'C': push(string(byte())); break;  // SHORT_BINSTRING, SHORT_BINBYTES
    case 'T':
    case 'B': push(string(u32())); break;   // BINSTRING, BINBYTES
    case 0x8e: push(string(u64())); break;  // BINBYTES8
    default: return false;
  }
  return true;
}

// Tuples, lists, dicts and sets; false if `op` is none of them.
bool PickleMachine::containers(unsigned char op) {
  switch (op) {
    case ')': push(&document_.empty_tuple_); break;            // EMPTY_TUPLE
    case 't': push(sequence(Kind::Tuple, pop_mark())); break;  // TUPLE
    case 0x85:
    case 0x86:
    case 0x87: {  // TUPLE1..3
      const size_t n = op - 0x84u;
      if (stack_.size() < fence() + n) fail("tuple of " + std::to_string(n) + " reaches below a MARK");
      std::vector<PickleRef> items(stack_.end() - static_cast<long>(n), stack_.end());
      stack_.resize(stack_.size() - n);
      push(sequence(Kind::Tuple, std::move(items)));
      break;
    }
    case ']': push(make(Kind::List)); break;  // EMPTY_LIST
    case 'a': {                               // APPEND
      const PickleRef item = pop();
      of_kind(top(), Kind::List, "APPEND")->items.push_back(item);
      break;
    }
    case 'e': {  // APPENDS
      const auto items = pop_mark();
      auto& list = of_kind(top(), Kind::List, "APPENDS")->items;
      list.insert(list.end(), items.begin(), items.end());
      break;
    }
    case '}': push(make(Kind::Dict)); break;  // EMPTY_DICT
    case 's': {                               // SETITEM
      const PickleRef value = pop(), key = pop();
      auto& dict = of_kind(top(), Kind::Dict, "SETITEM")->items;
      dict.push_back(key);
      dict.push_back(value);
      break;
    }
    case 'u': {  // SETITEMS
      const auto items = pop_mark();
      if (items.size() % 2) fail("SETITEMS with an odd number of items");
      auto& dict = of_kind(top(), Kind::Dict, "SETITEMS")->items;
      dict.insert(dict.end(), items.begin(), items.end());
      break;
    }
    case 0x8f: push(make(Kind::List)); break;  // EMPTY_SET: read as a list
    case 0x90: {                               // ADDITEMS
      const auto items = pop_mark();
      auto& set = of_kind(top(), Kind::List, "ADDITEMS")->items;
      set.insert(set.end(), items.begin(), items.end());
      break;
    }
    case 0x91: push(sequence(Kind::List, pop_mark())); break;  // FROZENSET
    default: return false;
  }
  return true;
}

// Globals, and what calls or builds objects: all decided by the PickleObjects; false if
// `op` is none of them.
bool PickleMachine::calls(unsigned char op) {
  switch (op) {
    case 'c': {  // GLOBAL
      const std::string module = line();
      push(objects_.global(*this, module, line()));
      break;
    }
    case 0x93: {  // STACK_GLOBAL
      const PickleRef name = pop(), module = pop();
      if (module->kind != Kind::String || name->kind != Kind::String) fail("STACK_GLOBAL needs two strings");
      push(objects_.global(*this, module->text, name->text));
      break;
    }
    case 'R': {  // REDUCE
      const PickleRef args = pop(), callable = pop();
      push(objects_.reduce(*this, *callable, *of_kind(args, Kind::Tuple, "REDUCE arguments")));
      break;
    }
    case 'b': {  // BUILD
      const PickleRef state = pop();
      objects_.build(*this, *top(), *state);
      break;
    }
    case 0x81: {  // NEWOBJ: cls.__new__(cls, *args)
      pop();
      push(objects_.new_object(*this, *pop(), /*keywords=*/false));
      break;
    }
    case 0x92: {  // NEWOBJ_EX: with keyword arguments
      pop();
      pop();
      push(objects_.new_object(*this, *pop(), /*keywords=*/true));
      break;
    }
    case 'Q': push(objects_.persistent(*this, *pop())); break;  // BINPERSID
    default: return false;
  }
  return true;
}

const unsigned char* PickleMachine::bytes(uint64_t n) {
  if (static_cast<uint64_t>(end_ - p_) < n) fail("ends in the middle of an opcode");
  const unsigned char* at = p_;
  p_ += n;
  return at;
}

uint16_t PickleMachine::u16() { return load_le<uint16_t>(bytes(2)); }
uint32_t PickleMachine::u32() { return load_le<uint32_t>(bytes(4)); }
uint64_t PickleMachine::u64() { return load_le<uint64_t>(bytes(8)); }

std::string PickleMachine::line() {
  const auto* nl = static_cast<const unsigned char*>(std::memchr(p_, '\n', static_cast<size_t>(end_ - p_)));
  if (!nl) fail("GLOBAL without a newline");
  std::string s(reinterpret_cast<const char*>(p_), static_cast<size_t>(nl - p_));
  p_ = nl + 1;
  return s;
}

PickleRef PickleMachine::string(uint64_t n) {
  const unsigned char* b = bytes(n);  // checked against the bytes left before anything is made
  const PickleRef v = make(Kind::String);
  v->text.assign(reinterpret_cast<const char*>(b), n);
  return v;
}

PickleRef PickleMachine::integer(int64_t i) {
  const PickleRef v = make(Kind::Int);
  v->integer = i;
  return v;
}

PickleRef PickleMachine::sequence(Kind kind, std::vector<PickleRef> items) {
  const PickleRef v = make(kind);
  v->items = std::move(items);
  return v;
}

// Values below the innermost MARK belong to an enclosing construct: no opcode but the
// mark-consuming ones may take them (CPython's "stack underflow").
PickleRef PickleMachine::pop() {
  if (stack_.size() <= fence()) fail("pops an empty stack or below a MARK");
  const PickleRef v = stack_.back();
  stack_.pop_back();
  return v;
}

PickleRef PickleMachine::top() const {
  if (stack_.empty()) fail("reads an empty stack");
  return stack_.back();
}

std::vector<PickleRef> PickleMachine::pop_mark() {
  if (marks_.empty()) fail("no MARK to pop to");
  const size_t mark = marks_.back();
  marks_.pop_back();
  if (mark > stack_.size()) fail("a MARK above the top of the stack");
  std::vector<PickleRef> items(stack_.begin() + static_cast<long>(mark), stack_.end());
  stack_.resize(mark);
  return items;
}

void PickleMachine::remember(uint64_t index) {
  const PickleRef v = top();
  if (memo_.size() >= kMaxMemo && memo_.find(index) == memo_.end()) {
    fail("stores more than " + std::to_string(kMaxMemo) + " memo entries");
  }
  memo_[index] = v;
}

PickleRef PickleMachine::recall(uint64_t index) const {
  const auto it = memo_.find(index);
  if (it == memo_.end()) fail("reads memo " + std::to_string(index) + ", which was never stored");
  return it->second;
}

PickleRef PickleMachine::of_kind(PickleRef v, Kind kind, const char* what) const {
  if (v->kind != kind) fail(std::string(what) + " on the wrong kind of value");
  return v;
}

}  // namespace tensormap::detail
