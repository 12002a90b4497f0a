// tensormap::Writer: streams tensors into a new tensormap file, atomically.
//
// The caller declares every tensor (name, dtype, shape) up front, then hands over each
// tensor's bytes in table order, in one piece or in chunks, from any pointer. The bytes
// go straight to the file and are hashed on the way; the Writer's own memory is the
// header (proportional to the number of tensors) and never the data.
//
// Nothing is visible at the destination until commit(): the file is written under a
// temporary name in the destination's directory, synced, renamed over the destination
// and the directory synced. If anything fails, or the Writer is destroyed before
// commit(), the temporary file is removed and the destination is left as it was.
// The destination's permission bits are kept when it already exists.
//
// Thread-safety: a Writer is used by one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tensormap/dtype.h"
#include "tensormap/format.h"

namespace tensormap {

struct TensorSpec {
  std::string name;
  Dtype dtype;
  std::vector<uint64_t> shape;
};

struct WriterOptions {
  // Tensormap only: every tensor starts on a multiple of this (a power of two, 64 to 1 MiB).
  uint64_t alignment = 4096;
  // String-to-string metadata; keys must be unique.
  std::vector<std::pair<std::string, std::string>> metadata;
  // fsync the file and its directory before and after the rename. Turning it off trades
  // durability against a power cut for speed; atomicity against crashes stays.
  bool sync = true;
  // Tensormap, or Safetensors: a file any safetensors reader accepts, its tensors laid out
  // by element size (largest first) so that each is aligned to it, its JSON header padded
  // with spaces so that the data starts on a 4096-byte boundary.
  Format format = Format::Tensormap;
};

class Writer {
 public:
  // Validates the declarations (same rules as a reader applies) and creates the
  // temporary file. Throws Error(InvalidArgument) for a bad declaration, Error(Io) if the
  // temporary file cannot be created.
  Writer(std::string path, std::vector<TensorSpec> tensors, WriterOptions options = {});
  ~Writer();  // abandons the write unless commit() succeeded
  Writer(Writer&&) noexcept;
  Writer& operator=(Writer&&) noexcept;

  // Number of declared tensors, and the byte length each must receive.
  size_t tensor_count() const;
  uint64_t byte_length(size_t index) const;

  // Index of the tensor the next write() feeds; tensor_count() once all are complete.
  size_t current_tensor() const;

  // Appends bytes to the current tensor, moving to the next tensor when it is full.
  // Zero-length tensors are passed over automatically. Throws Error(InvalidArgument) if
  // the bytes would run past the current tensor's end.
  void write(const void* data, size_t size);

  // Writes one whole tensor. REQUIRES: the current tensor has received no bytes yet and
  // size == byte_length(current_tensor()).
  void write_tensor(const void* data, size_t size);

  // Finishes the file and moves it into place. REQUIRES: every tensor complete.
  // Throws Error(InvalidArgument) if some tensor is incomplete, Error(Io) if a write,
  // sync or rename fails; in both cases the destination is unchanged.
  void commit();

  // Discards everything written so far. Safe to call more than once.
  void abandon() noexcept;

  // Everything but the final rename: pads, writes the header and syncs the temporary
  // file, so that only rename_into_place() remains. For writers of several files that
  // rename them together (ShardedWriter). REQUIRES: every tensor complete.
  void finish();
  void rename_into_place();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensormap
