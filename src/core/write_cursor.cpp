// The declarations and write order every writer shares: see write_cursor.h.
#include "write_cursor.h"

#include <string_view>
#include <unordered_set>

#include "names.h"
#include "tensormap/error.h"
#include "tensormap/format.h"

namespace tensormap::detail {

WriteCursor::WriteCursor(std::string path, const std::vector<TensorSpec>& tensors) : path_(std::move(path)) {
  std::unordered_set<std::string_view> seen;
  names_.reserve(tensors.size());
  byte_lengths_.reserve(tensors.size());
  for (const TensorSpec& t : tensors) {
    if (!seen.insert(t.name).second) refuse("tensor " + quoted(t.name) + " is declared twice");
    if (!dtype_from_code(static_cast<uint8_t>(t.dtype))) {
      refuse("tensor " + quoted(t.name) + ": unknown dtype code " + std::to_string(static_cast<unsigned>(t.dtype)));
    }
    const auto n = format::tensor_byte_length(t.shape.data(), static_cast<unsigned>(t.shape.size()), dtype_size(t.dtype));
    if (!n) refuse("tensor " + quoted(t.name) + ": shape is too large (2^63 bytes or more)");
    names_.push_back(t.name);
    byte_lengths_.push_back(*n);
  }
}

void WriteCursor::refuse(const std::string& what) const { throw Error(ErrorKind::InvalidArgument, path_ + ": " + what); }

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
           " bytes in one piece, got " + std::to_string(size) + " (" + std::to_string(written_) +
           " already written)");
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
