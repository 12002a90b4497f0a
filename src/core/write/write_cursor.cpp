// The declarations and write order every writer shares: see write_cursor.h.
#include "write/write_cursor.h"

#include <string_view>
#include <unordered_map>

#include "format/names.h"
#include "tensormap/error.h"
#include "tensormap/format.h"

namespace tensormap::detail {

WriteCursor::WriteCursor(std::string path, const std::vector<TensorSpec>& tensors, bool aliases)
    : path_(std::move(path)) {
  std::unordered_map<std::string_view, size_t> seen;
  names_.reserve(tensors.size());
  byte_lengths_.reserve(tensors.size());
  aliases_.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorSpec& t = tensors[i];
    const std::string label = "tensor " + quoted(t.name);
    if (!seen.emplace(t.name, i).second) refuse(label + " is declared twice");
    if (!dtype_from_code(static_cast<uint8_t>(t.dtype))) {
      refuse(label + ": unknown dtype code " + std::to_string(static_cast<unsigned>(t.dtype)));
    }
    const auto n =
        format::tensor_byte_length(t.shape.data(), static_cast<unsigned>(t.shape.size()), dtype_size(t.dtype));
    if (!n) refuse(label + ": shape is too large (2^63 bytes or more)");
    names_.push_back(t.name);
    if (!t.alias_of) {
      byte_lengths_.push_back(*n);
      aliases_.emplace_back();
      continue;
    }
    if (!aliases) {
      refuse(label + " is declared an alias of " + quoted(*t.alias_of) +
             ", which this format cannot store: declare it without alias_of and write its bytes");
    }
    const auto target = seen.find(*t.alias_of);
    if (target == seen.end() || target->second == i) {
      refuse(label + " is an alias of " + quoted(*t.alias_of) + ", which is not declared before it");
    }
    const size_t root = aliases_[target->second].value_or(target->second);
    const TensorSpec& of = tensors[root];
    if (of.dtype != t.dtype || of.shape != t.shape) {
      refuse(label + " is an alias of " + quoted(*t.alias_of) + " but differs from it in dtype or shape");
    }
    if (*n == 0) refuse(label + " is an alias of an empty tensor; declare it without alias_of");
    byte_lengths_.push_back(0);
    aliases_.emplace_back(root);
    ++alias_count_;
  }
}

void WriteCursor::refuse(const std::string& what) const {
  throw Error(ErrorKind::InvalidArgument, path_ + ": " + what);
}

void WriteCursor::check_write(size_t size) const {
  if (size == 0) return;
  if (complete()) refuse("got " + std::to_string(size) + " bytes after the last tensor was complete");
  const uint64_t room = byte_lengths_[current_] - written_;
  if (size > room) {
    refuse("tensor " + quoted(names_[current_]) + " takes " + std::to_string(room) + " more bytes, got " +
           std::to_string(size));
  }
}

void WriteCursor::check_whole(size_t size) const {
  if (complete()) refuse("write_tensor called after every tensor was complete");
  if (written_ != 0 || size != byte_lengths_[current_]) {
    refuse("tensor " + quoted(names_[current_]) + " takes " + std::to_string(byte_lengths_[current_]) +
           " bytes in one piece, got " + std::to_string(size) + " (" + std::to_string(written_) + " already written)");
  }
}

void WriteCursor::check_complete() const {
  if (complete()) return;
  refuse("tensor " + quoted(names_[current_]) + " received " + std::to_string(written_) + " of its " +
         std::to_string(byte_lengths_[current_]) + " bytes; nothing was committed");
}

void WriteCursor::advance(size_t size, const std::function<void(size_t)>& done) {
  written_ += size;
  while (current_ < byte_lengths_.size() && written_ == byte_lengths_[current_]) {
    done(current_);
    ++current_;
    written_ = 0;
  }
}

}  // namespace tensormap::detail
