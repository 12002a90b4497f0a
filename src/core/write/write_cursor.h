// The declarations of a writer and how far its bytes have come: the one place that checks
// declared tensors (repeated names, sizes) and the order of writes, for every writer
// (Writer, ShardedWriter, TorchSaveWriter), with one set of messages. Internal to the core.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "tensormap/tensor_spec.h"

namespace tensormap::detail {

class WriteCursor {
 public:
  // Throws Error(InvalidArgument) naming `path` for a name declared twice, a tensor whose
  // byte length does not fit below 2^63, or an alias (TensorSpec::alias_of) that the
  // format cannot store (`aliases` false), names no earlier tensor, or differs from it.
  WriteCursor(std::string path, const std::vector<TensorSpec>& tensors, bool aliases);

  // The bytes each tensor must receive: 0 for an alias.
  const std::vector<uint64_t>& byte_lengths() const { return byte_lengths_; }
  // The tensor whose bytes an alias names (never an alias itself), or nothing.
  const std::vector<std::optional<size_t>>& aliases() const { return aliases_; }
  bool has_aliases() const { return alias_count_ > 0; }
  size_t size() const { return byte_lengths_.size(); }
  size_t current() const { return current_; }
  uint64_t written() const { return written_; }  // bytes of the current tensor so far
  bool complete() const { return current_ == byte_lengths_.size(); }

  // Throws Error(InvalidArgument) unless `size` bytes fit in the current tensor
  // (write()), or unless they are exactly the whole current tensor (write_tensor()).
  void check_write(size_t size) const;
  void check_whole(size_t size) const;
  // Throws Error(InvalidArgument) naming the first incomplete tensor.
  void check_complete() const;

  // Records `size` written bytes, then moves past every tensor that is complete (zero-
  // length ones included), calling `done(index)` for each. Call with 0 once at the start.
  void advance(size_t size, const std::function<void(size_t)>& done);

  const std::string& path() const { return path_; }
  const std::string& name(size_t index) const { return names_[index]; }

 private:
  [[noreturn]] void refuse(const std::string& what) const;
  std::string path_;
  std::vector<std::string> names_;
  std::vector<uint64_t> byte_lengths_;
  std::vector<std::optional<size_t>> aliases_;
  size_t alias_count_ = 0;
  size_t current_ = 0;
  uint64_t written_ = 0;
};

}  // namespace tensormap::detail
