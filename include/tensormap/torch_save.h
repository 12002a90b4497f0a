// Writing Python's torch.save archives, which Python's torch.load (and tensormap) read
// back as a dict of tensors. No LibTorch is needed.
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

#include "tensormap/export.h"
#include "tensormap/writer.h"

namespace tensormap {

class TENSORMAP_EXPORT TorchSaveWriter final : public FormatWriter {
 public:
  // Every dtype is written; U16, U32, U64 and F8 as torch 2.x writes them, which only
  // torch 2.x (and tensormap) reads back. Of the options, only `sync` applies. Throws
  // Error(InvalidArgument) for repeated names, Error(Io) if the file cannot be made.
  TorchSaveWriter(std::string path, std::vector<TensorSpec> tensors, WriterOptions options = {});
};

}  // namespace tensormap
