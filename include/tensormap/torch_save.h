// Writing Python's torch.save archives, which Python's torch.load (and tensormap) read
// back as a dict of tensors.
//
// The archive is a zip of uncompressed records, one per tensor, each aligned to 64 bytes,
// plus data.pkl, a pickle of an OrderedDict of tensors. Records are streamed one tensor at
// a time; the file is written under a temporary name and renamed into place on commit.
//
// Thread-safety: a TorchSaveWriter is used by one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tensormap/writer.h"

namespace tensormap {

class TorchSaveWriter {
 public:
  // Every dtype is written; U16, U32, U64 and F8 as torch 2.x writes them, which only
  // torch 2.x (and tensormap) reads back. Throws Error(InvalidArgument) for repeated
  // names, Error(Io) if the file cannot be made.
  TorchSaveWriter(std::string path, std::vector<TensorSpec> tensors, bool sync = true);
  ~TorchSaveWriter();  // abandons the write unless commit() succeeded

  size_t tensor_count() const;
  uint64_t byte_length(size_t index) const;

  // The next tensor, whole, in declaration order. Empty tensors need no call (as Writer).
  void write_tensor(const void* data, size_t size);

  // REQUIRES: every tensor written.
  void commit();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensormap
