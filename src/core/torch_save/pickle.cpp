// The bounded pickle machine: see pickle.h.
#include "torch_save/pickle.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "tensormap/error.h"
#include "util/bytes.h"

namespace tensormap::detail {
namespace {

using Kind = PickleValue::Kind;

constexpr uint64_t kMaxMemo = uint64_t{1} << 24;
// What a heap block costs beyond its bytes: the allocator's header, and its least block
// (32 bytes) for the small ones.
constexpr uint64_t kBlock = 32;

std::string hex(unsigned v) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "%02x", v);
  return buf;
}

std::string mib(uint64_t bytes) { return std::to_string(bytes >> 20) + " MiB"; }

}  // namespace

PickleBudget::PickleBudget(uint64_t pickle_size)
    : limit_(pickle_size >= (kMax - kBase) / kFactor ? kMax : kBase + kFactor * pickle_size) {}

void PickleBudget::charge(uint64_t bytes, const std::string& path) {
  if (bytes > limit_ - held_) {
    throw Error(ErrorKind::UnsupportedArchive,
                path + ": data.pkl: reading it needs more than " + std::to_string(limit_) + " bytes (" + mib(limit_) +
                    "), more than tensormap allows a pickle of its size (" + std::to_string(kFactor) +
                    " times its size plus " + mib(kBase) + ", at most " + mib(kMax) + ")");
  }
  held_ += bytes;
}

std::string_view PickleValue::text() const {
  const bool has_text = kind == Kind::String || kind == Kind::Storage || kind == Kind::Global || kind == Kind::Opaque;
  return has_text ? std::string_view(text_data, text_size) : std::string_view();
}

const std::vector<PickleRef>& PickleValue::items() const {
  static const std::vector<PickleRef> kNone;
  return (kind == Kind::Tuple || kind == Kind::List || kind == Kind::Dict) && list ? *list : kNone;
}

PickleDocument::PickleDocument(uint64_t pickle_size) : budget(pickle_size) {
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
    : document_(document), objects_(objects), p_(data), end_(data + size), path_(path) {}

void PickleMachine::fail(const std::string& what) const {
  throw Error(ErrorKind::UnsupportedArchive, path_ + ": data.pkl: " + what);
}

static_assert(sizeof(PickleValue) == 24, "a value is 24 bytes: the budget's factor counts on it");

PickleRef PickleMachine::make(Kind kind) {
  charge(sizeof(PickleValue));
  PickleValue& v = document_.values_.emplace_back();
  v.kind = kind;
  return &v;
}

void PickleMachine::keep_text(PickleValue& v, std::string_view text) {
  if (text.size() > UINT32_MAX) fail("a text of " + std::to_string(text.size()) + " bytes");
  charge(sizeof(std::string) + kBlock + text.size());
  const std::string& kept = document_.texts_.emplace_back(text);
  v.text_data = kept.data();
  v.text_size = static_cast<uint32_t>(kept.size());
}

void PickleMachine::share_text(PickleValue& v, const PickleValue& other) {
  v.text_data = other.text_data;
  v.text_size = other.text_size;
}

TensorDescription& PickleMachine::make_tensor(PickleValue& v, size_t rank, size_t key_size) {
  charge(sizeof(TensorDescription) + 3 * kBlock + key_size + 2 * sizeof(int64_t) * rank);
  v.tensor = &document_.tensors_.emplace_back();
  return *v.tensor;
}

// Gives `v` room for `needed` elements, at least doubling as push_back would, with the
// growth charged first.
template <typename T>
void PickleMachine::reserve_charged(std::vector<T>& v, size_t needed) {
  if (needed <= v.capacity()) return;
  const size_t capacity = std::max(needed, 2 * v.capacity());
  charge(sizeof(T) * (capacity - v.capacity()) + (v.capacity() == 0 ? kBlock : 0));
  v.reserve(capacity);
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
    case 0x80: byte(); break;                // PROTO
    case 0x95: bytes(8); break;              // FRAME: lengths only
    case 'q': remember(byte()); break;       // BINPUT
    case 'r': remember(u32()); break;        // LONG_BINPUT
    case 0x94: remember(memo_size_); break;  // MEMOIZE
    case 'h': push(recall(byte())); break;   // BINGET
    case 'j': push(recall(u32())); break;    // LONG_BINGET
    case '(':                                // MARK
      reserve_charged(marks_, std::max<size_t>(marks_.size() + 1, 8));
      marks_.push_back(stack_.size());
      break;
    case '0': pop(); break;                      // POP
    case '1': stack_.resize(pop_mark()); break;  // POP_MARK
    case '2': push(top()); break;                // DUP
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
    case ')': push(&document_.empty_tuple_); break;  // EMPTY_TUPLE
    case 't': {                                      // TUPLE
      const size_t mark = pop_mark();
      push(sequence(Kind::Tuple, stack_.size() - mark));
      break;
    }
    case 0x85:
    case 0x86:
    case 0x87: {  // TUPLE1..3
      const size_t n = op - 0x84u;
      if (stack_.size() < fence() + n) fail("tuple of " + std::to_string(n) + " reaches below a MARK");
      push(sequence(Kind::Tuple, n));
      break;
    }
    case ']': push(make(Kind::List)); break;  // EMPTY_LIST
    case 'a': {                               // APPEND
      if (stack_.size() < fence() + 2) fail("APPEND reaches below a MARK");
      append_from(*of_kind(stack_[stack_.size() - 2], Kind::List, "APPEND"), stack_.size() - 1);
      break;
    }
    case 'e': {  // APPENDS
      const size_t mark = pop_mark();
      if (mark == 0) fail("APPENDS without a list below its MARK");
      append_from(*of_kind(stack_[mark - 1], Kind::List, "APPENDS"), mark);
      break;
    }
    case '}': push(make(Kind::Dict)); break;  // EMPTY_DICT
    case 's': {                               // SETITEM
      if (stack_.size() < fence() + 3) fail("SETITEM reaches below a MARK");
      append_from(*of_kind(stack_[stack_.size() - 3], Kind::Dict, "SETITEM"), stack_.size() - 2);
      break;
    }
    case 'u': {  // SETITEMS
      const size_t mark = pop_mark();
      if ((stack_.size() - mark) % 2) fail("SETITEMS with an odd number of items");
      if (mark == 0) fail("SETITEMS without a dict below its MARK");
      append_from(*of_kind(stack_[mark - 1], Kind::Dict, "SETITEMS"), mark);
      break;
    }
    case 0x8f: push(make(Kind::List)); break;  // EMPTY_SET: read as a list
    case 0x90: {                               // ADDITEMS
      const size_t mark = pop_mark();
      if (mark == 0) fail("ADDITEMS without a set below its MARK");
      append_from(*of_kind(stack_[mark - 1], Kind::List, "ADDITEMS"), mark);
      break;
    }
    case 0x91: {  // FROZENSET
      const size_t mark = pop_mark();
      push(sequence(Kind::List, stack_.size() - mark));
      break;
    }
    default: return false;
  }
  return true;
}

// Globals, and what calls or builds objects: all decided by the PickleObjects; false if
// `op` is none of them.
bool PickleMachine::calls(unsigned char op) {
  switch (op) {
    case 'c': {  // GLOBAL
      const std::string_view module = line();
      push(objects_.global(*this, module, line()));
      break;
    }
    case 0x93: {  // STACK_GLOBAL
      const PickleRef name = pop(), module = pop();
      if (module->kind != Kind::String || name->kind != Kind::String) fail("STACK_GLOBAL needs two strings");
      push(objects_.global(*this, module->text(), name->text()));
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

std::string_view PickleMachine::line() {
  const auto* nl = static_cast<const unsigned char*>(std::memchr(p_, '\n', static_cast<size_t>(end_ - p_)));
  if (!nl) fail("GLOBAL without a newline");
  const std::string_view s(reinterpret_cast<const char*>(p_), static_cast<size_t>(nl - p_));
  p_ = nl + 1;
  return s;
}

PickleRef PickleMachine::string(uint64_t n) {
  const unsigned char* b = bytes(n);  // checked against the bytes left before anything is made
  if (n > UINT32_MAX) fail("a string of " + std::to_string(n) + " bytes");
  const PickleRef v = make(Kind::String);
  v->text_data = reinterpret_cast<const char*>(b);
  v->text_size = static_cast<uint32_t>(n);
  return v;
}

PickleRef PickleMachine::integer(int64_t i) {
  const PickleRef v = make(Kind::Int);
  v->integer = i;
  return v;
}

PickleRef PickleMachine::sequence(Kind kind, size_t n) {
  if (n == 0 && kind == Kind::Tuple) return &document_.empty_tuple_;
  const PickleRef v = make(kind);
  append_from(*v, stack_.size() - n);
  return v;
}

void PickleMachine::append_from(PickleValue& container, size_t from) {
  const size_t n = stack_.size() - from;
  if (n > 0) {
    if (!container.list) {
      charge(sizeof(std::vector<PickleRef>));
      container.list = &document_.lists_.emplace_back();
    }
    std::vector<PickleRef>& items = *container.list;
    reserve_charged(items, items.size() + n);
    items.insert(items.end(), stack_.begin() + static_cast<long>(from), stack_.end());
  }
  stack_.resize(from);
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

size_t PickleMachine::pop_mark() {
  if (marks_.empty()) fail("no MARK to pop to");
  const size_t mark = marks_.back();
  marks_.pop_back();
  if (mark > stack_.size()) fail("a MARK above the top of the stack");
  return mark;
}

// The memo is a vector by index: picklers number their entries 0, 1, 2... (MEMOIZE
// always does), so a sparse index only costs what its slots are charged.
void PickleMachine::remember(uint64_t index) {
  const PickleRef v = top();
  if (index >= kMaxMemo)
    fail("stores memo " + std::to_string(index) + ", past the " + std::to_string(kMaxMemo) + " allowed");
  if (index >= memo_.size()) {
    reserve_charged(memo_, static_cast<size_t>(index) + 1);
    memo_.resize(index + 1, nullptr);
  }
  if (!memo_[index]) ++memo_size_;
  memo_[index] = v;
}

PickleRef PickleMachine::recall(uint64_t index) const {
  if (index >= memo_.size() || !memo_[index]) fail("reads memo " + std::to_string(index) + ", which was never stored");
  return memo_[index];
}

PickleRef PickleMachine::of_kind(PickleRef v, Kind kind, const char* what) const {
  if (v->kind != kind) fail(std::string(what) + " on the wrong kind of value");
  return v;
}

}  // namespace tensormap::detail
